"""Conventions shared by data, model and training code (the LLaVA ones users already know)."""

IGNORE_INDEX = -100
"""Label value ignored by the loss: prompt tokens, padding and image placeholder tokens."""

DEFAULT_IMAGE_TOKEN = "<image>"
"""Placeholder in LLaVA conversations; expanded to one token per visual feature before the LM."""

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""Pixel normalisation of OpenAI's CLIP towers (LLaVA-1.5's ViT-L/14-336)."""

SIGLIP_MEAN_STD = (0.5, 0.5, 0.5)
"""Pixel mean and std of SigLIP towers."""
