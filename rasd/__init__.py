"""rasd: lossless speculative decoding for Hugging Face causal LMs."""

from rasd._version import __version__

__all__ = ["__version__"]
