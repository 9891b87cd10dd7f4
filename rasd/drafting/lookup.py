"""Retrieval drafters: prompt lookup (PLD-style, over the prompt and the output) and corpus lookup
(REST-style, over a static datastore). Both return trees, not chains, from the suffix automaton."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from rasd.datastore import Datastore
from rasd.drafting.base import DraftContext, Proposal, StepBudget, StepResult
from rasd.tree import Source, TokenTree


class PromptLookup:
    """Continues the longest suffix of the text that occurred earlier in the prompt or the output.

    max_depth: tokens per path; min_match: shortest suffix match worth proposing (PLD uses 1-3 tokens).
    """

    def __init__(self, *, max_depth: int = 16, min_match: int = 2, backoff_min_count: int = 0) -> None:
        if max_depth < 1 or min_match < 1:
            raise ValueError("max_depth and min_match must be >= 1")
        self.max_depth, self.min_match, self.backoff_min_count = max_depth, min_match, backoff_min_count
        self.store = Datastore()

    def begin(self, context: DraftContext) -> None:
        self.store = Datastore()
        self.store.add(list(context.prompt))

    def propose(self, budget: StepBudget) -> Proposal:
        return _timed(budget, self._retrieve)

    def _retrieve(self, max_nodes: int) -> TokenTree:
        return self.store.retrieve_tail(
            max_nodes, self.max_depth, min_match=self.min_match, backoff_min_count=self.backoff_min_count
        )

    def advance(self, step: StepResult) -> None:
        self.store.extend(list(step.tokens))


class CorpusLookup:
    """Continues the longest suffix of the text found in a static corpus datastore (shared, read-only).

    store: a :class:`rasd.Datastore` (or anything with the same ``matcher()``, e.g. a sharded store), or the
        path of a saved one (memory-mapped).
    tokenizer: when given, the store must have been built with it (ValueError otherwise).
    """

    def __init__(
        self,
        store: Datastore | str | os.PathLike | Any,
        *,
        tokenizer: Any = None,
        max_depth: int = 12,
        min_match: int = 2,
        backoff_min_count: int = 0,
    ) -> None:
        if max_depth < 1 or min_match < 1:
            raise ValueError("max_depth and min_match must be >= 1")
        if isinstance(store, (str, os.PathLike)):
            store = Datastore.load(store, tokenizer=tokenizer)
        elif tokenizer is not None and hasattr(store, "check_tokenizer"):
            store.check_tokenizer(tokenizer)
        self.store = store
        self.max_depth, self.min_match, self.backoff_min_count = max_depth, min_match, backoff_min_count
        self.matcher = self.store.matcher()

    def begin(self, context: DraftContext) -> None:
        self.matcher = self.store.matcher()
        self.matcher.feed(list(context.prompt))

    def propose(self, budget: StepBudget) -> Proposal:
        return _timed(budget, self._retrieve)

    def _retrieve(self, max_nodes: int) -> TokenTree:
        return self.matcher.retrieve(
            max_nodes,
            self.max_depth,
            min_match=self.min_match,
            backoff_min_count=self.backoff_min_count,
            source=Source.CORPUS,
        )

    def advance(self, step: StepResult) -> None:
        self.matcher.feed(list(step.tokens))


def _timed(budget: StepBudget, retrieve: Callable[[int], TokenTree]) -> Proposal:
    """A retrieval proposal of at most ``budget.max_nodes`` nodes, with the seconds it took."""
    start = time.perf_counter()
    tree = retrieve(budget.max_nodes) if budget.max_nodes > 0 else TokenTree.empty()
    return Proposal(tree, retrieval_seconds=time.perf_counter() - start)
