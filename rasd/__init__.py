"""rasd: lossless speculative decoding for Hugging Face causal LMs.

Main entry points: :func:`generate` / :class:`SpeculativeGenerator` (speculative generation),
:class:`Datastore` (suffix-automaton retrieval), :class:`TokenTree` (the one tree representation),
:func:`profile_verify` (the target's verification cost curve).
"""

from rasd._version import __version__
from rasd.costmodel import profile_verify
from rasd.datastore import Datastore, Matcher, build_datastore, ensure_datastore, tokenizer_fingerprint
from rasd.generate import (
    GenerationResult,
    GenerationStats,
    SpeculativeGenerator,
    generate,
    pld_generate,
    rest_generate,
)
from rasd.tree import Source, TokenTree

__all__ = [
    "Datastore",
    "GenerationResult",
    "GenerationStats",
    "Matcher",
    "Source",
    "SpeculativeGenerator",
    "TokenTree",
    "__version__",
    "build_datastore",
    "ensure_datastore",
    "generate",
    "pld_generate",
    "profile_verify",
    "rest_generate",
    "tokenizer_fingerprint",
]
