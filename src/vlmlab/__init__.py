"""vlmlab: configuration-driven experiments for LLaVA-style vision-language models."""

__version__ = "0.1.0"
