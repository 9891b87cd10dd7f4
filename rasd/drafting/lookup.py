"""Retrieval drafters: prompt lookup (PLD-style, over the prompt and the output) and corpus lookup
(REST-style, over a static datastore). Both return trees, not chains, from the suffix automaton."""

from __future__ import annotations

import os
from collections.abc import Sequence

from rasd.datastore import Datastore
from rasd.tree import Source, TokenTree


class PromptLookup:
    """Continues the longest suffix of the text that occurred earlier in the prompt or the output.

    max_depth: tokens per path; min_match: shortest suffix match worth proposing (PLD uses 1-3 tokens).
    """

    source = Source.PROMPT

    def __init__(self, *, max_depth: int = 16, min_match: int = 2, backoff_min_count: int = 0) -> None:
        if max_depth < 1 or min_match < 1:
            raise ValueError("max_depth and min_match must be >= 1")
        self.max_depth, self.min_match, self.backoff_min_count = max_depth, min_match, backoff_min_count
        self.store = Datastore()

    def begin(self, prompt: Sequence[int]) -> None:
        self.store = Datastore()
        self.store.add(list(prompt))

    def propose(self, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        return self.store.retrieve_tail(
            budget, self.max_depth, min_match=self.min_match, backoff_min_count=self.backoff_min_count
        )

    def advance(self, tokens: Sequence[int]) -> None:
        self.store.extend(list(tokens))


class CorpusLookup:
    """Continues the longest suffix of the text found in a static corpus datastore (shared, read-only).

    store: a :class:`rasd.Datastore` or the path of a saved one (memory-mapped).
    """

    source = Source.CORPUS

    def __init__(
        self,
        store: Datastore | str | os.PathLike,
        *,
        tokenizer=None,
        max_depth: int = 12,
        min_match: int = 2,
        backoff_min_count: int = 0,
    ) -> None:
        if max_depth < 1 or min_match < 1:
            raise ValueError("max_depth and min_match must be >= 1")
        self.store = store if isinstance(store, Datastore) else Datastore.load(store, tokenizer=tokenizer)
        self.max_depth, self.min_match, self.backoff_min_count = max_depth, min_match, backoff_min_count
        self.matcher = self.store.matcher()

    def begin(self, prompt: Sequence[int]) -> None:
        self.matcher = self.store.matcher()
        self.matcher.feed(list(prompt))

    def propose(self, budget: int) -> TokenTree:
        if budget <= 0:
            return TokenTree.empty()
        return self.matcher.retrieve(
            budget,
            self.max_depth,
            min_match=self.min_match,
            backoff_min_count=self.backoff_min_count,
            source=Source.CORPUS,
        )

    def advance(self, tokens: Sequence[int]) -> None:
        self.matcher.feed(list(tokens))
