"""Drafters: everything that proposes a :class:`rasd.tree.TokenTree` for the target to verify.

``PromptLookup`` (PLD-style, prompt + output), ``CorpusLookup`` (REST-style, static datastore),
``TokenRecycling`` (the target's own top-k successors from earlier verifications), ``DraftModel``
(EAGLE-2-style dynamic draft trees) and ``Fused`` (RASD: retrieval trees scored by and fused with the draft
tree). All speak the step contract of :mod:`rasd.drafting.base`.
"""

from rasd.drafting.base import DraftContext, Drafter, Proposal, StaticTreeDrafter, StepBudget, StepResult
from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
from rasd.drafting.fused import Fused
from rasd.drafting.fusion import merge_trees
from rasd.drafting.lookup import CorpusLookup, PromptLookup
from rasd.drafting.recycling import RecyclingConfig, TokenRecycling

__all__ = [
    "CorpusLookup",
    "DraftContext",
    "DraftModel",
    "DraftTreeConfig",
    "Drafter",
    "Fused",
    "PromptLookup",
    "Proposal",
    "RecyclingConfig",
    "StaticTreeDrafter",
    "StepBudget",
    "StepResult",
    "TokenRecycling",
    "merge_trees",
]
