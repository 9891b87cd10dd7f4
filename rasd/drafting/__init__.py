"""Drafters: everything that proposes a :class:`rasd.tree.TokenTree` for the target to verify.

``PromptLookup`` (PLD-style, prompt + output), ``CorpusLookup`` (REST-style, static datastore),
``DraftModel`` (EAGLE-2-style dynamic draft trees) and ``Fused`` (RASD: retrieval trees pruned by and fused
with the draft tree). All speak the :class:`Drafter` protocol.
"""

from rasd.drafting.base import Drafter, StaticTreeDrafter
from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
from rasd.drafting.fused import Fused
from rasd.drafting.fusion import merge_trees
from rasd.drafting.lookup import CorpusLookup, PromptLookup

__all__ = [
    "CorpusLookup",
    "DraftModel",
    "DraftTreeConfig",
    "Drafter",
    "Fused",
    "PromptLookup",
    "StaticTreeDrafter",
    "merge_trees",
]
