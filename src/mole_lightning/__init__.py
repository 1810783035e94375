"""mole_lightning: sparse Mixture of LoRA Experts for LLaVA-style multimodal LLMs, as Lightning modules."""

__version__ = "0.1.0"
