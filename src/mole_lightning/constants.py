"""Conventions shared by data, model and training code (the LLaVA ones users already know)."""

IGNORE_INDEX = -100
"""Label value ignored by the loss: prompt tokens, padding and image placeholder tokens."""

DEFAULT_IMAGE_TOKEN = "<image>"
"""Placeholder in LLaVA conversations; expanded to one token per visual feature before the LM."""
