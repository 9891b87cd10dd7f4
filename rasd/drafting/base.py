"""The one small protocol every drafter implements, so the decoding loop never branches on drafter type.

Lifecycle for one sequence::

    drafter.begin(prompt_tokens)            # all committed tokens; the last one is the root
    loop:
        tree = drafter.propose(budget)      # a TokenTree continuing the committed tokens
        ... the target verifies it ...
        drafter.advance(committed_tokens)   # the accepted tokens plus the bonus token

A drafter owns whatever state it needs (a dynamic datastore, a draft model's KV cache) and keeps it in
step with the committed text through ``begin``/``advance``. ``propose`` must return at most ``budget``
nodes (0 means "propose nothing").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable

from rasd.tree import TokenTree


@runtime_checkable
class Drafter(Protocol):
    """Proposes candidate trees; learns from what was committed."""

    def begin(self, prompt: Sequence[int]) -> None:
        """Start a new sequence whose committed tokens are ``prompt`` (non-empty)."""

    def propose(self, budget: int) -> TokenTree:
        """A tree of at most ``budget`` nodes continuing the committed tokens."""

    def advance(self, tokens: Sequence[int]) -> None:
        """``tokens`` were committed after the last proposal (accepted tokens, then the bonus token)."""


class StaticTreeDrafter:
    """Proposes whatever a callable returns for the committed tokens (tests, oracles, custom drafters).

    ``tree_fn(committed_tokens) -> TokenTree``; trees larger than the budget are cut to their first
    ``budget`` nodes (a prefix of a topologically ordered tree is a tree).
    """

    def __init__(self, tree_fn: Callable[[list[int]], TokenTree]) -> None:
        self.tree_fn = tree_fn
        self.tokens: list[int] = []

    def begin(self, prompt: Sequence[int]) -> None:
        self.tokens = list(prompt)

    def propose(self, budget: int) -> TokenTree:
        tree = self.tree_fn(self.tokens)
        if len(tree) > budget:
            keep = [i < budget for i in range(len(tree))]
            tree = tree.subtree(keep)
        return tree

    def advance(self, tokens: Sequence[int]) -> None:
        self.tokens.extend(tokens)
