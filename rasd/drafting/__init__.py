"""Drafters: everything that proposes a :class:`rasd.tree.TokenTree` for the target to verify."""

from rasd.drafting.base import Drafter, StaticTreeDrafter

__all__ = ["Drafter", "StaticTreeDrafter"]
