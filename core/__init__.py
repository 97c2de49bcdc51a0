"""loraship: take a LoRA fine-tune to a fast, secure Triton endpoint."""

__version__ = "0.1.0"
