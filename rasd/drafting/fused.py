"""RASD: retrieval trees and a draft-model tree fused into one tree under one budget.

Per step: every retriever proposes a tree (prompt lookup over the prompt and output, corpus lookup over a
static datastore); the trees are fused by longest-prefix matching (:func:`merge_trees`); the fused retrieval
tree seeds the draft model, which scores every retrieval node with its own probabilities (the pruning
signal), expands the most promising nodes (draft and retrieval alike) and hands the planner the union; the
planner keeps the best-first prefix that maximises expected tokens per second under the measured cost of
verification. When the planner expects the retrieval tree alone to beat drafting (a long verbatim match,
or a draft that does not pay on this machine), the draft model is skipped for that step.

With ``overlap=True`` retrieval runs in a worker thread while the draft model catches up on the committed
tokens (the native datastore releases the GIL); the draft then starts expanding with the retrieval
candidates already scored.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rasd.drafting.base import Drafter
from rasd.drafting.draft_model import DraftModel
from rasd.drafting.fusion import merge_trees
from rasd.tree import TokenTree


class Fused:
    """retrievers: drafters whose trees are deterministic (PromptLookup, CorpusLookup, ...).
    draft: the draft-model drafter, or None for retrieval-only speculation (PLD/REST-style).
    planner: shared with the generator and the draft model; decides sizes and whether to draft.
    """

    def __init__(
        self,
        retrievers: Sequence[Drafter],
        draft: DraftModel | None = None,
        *,
        planner=None,
        overlap: bool = False,
    ) -> None:
        if not retrievers and draft is None:
            raise ValueError("Fused needs at least one retriever or a draft model")
        self.retrievers = list(retrievers)
        self.draft = draft
        self.planner = planner
        self.overlap = overlap and draft is not None and bool(self.retrievers)
        self._pool = ThreadPoolExecutor(max_workers=1) if self.overlap else None
        self.step = 0
        self.last_drafted = False
        self.retrieval_seconds = 0.0

    def configure_sampling(self, sampling, generator) -> None:
        if self.draft is not None:
            self.draft.configure_sampling(sampling, generator)

    def begin(self, prompt: Sequence[int]) -> None:
        self.step = 0
        for r in self.retrievers:
            r.begin(prompt)
        if self.draft is not None:
            self.draft.begin(prompt)

    def _retrieve(self, budget: int) -> TokenTree:
        start = time.perf_counter()
        trees = [r.propose(budget) for r in self.retrievers]
        seed = merge_trees(trees) if len(trees) > 1 else (trees[0] if trees else TokenTree.empty())
        self.retrieval_seconds += time.perf_counter() - start
        return seed

    def propose(self, budget: int) -> TokenTree:
        self.step += 1
        start = time.perf_counter()
        if self.overlap:
            # Retrieval runs in the worker while the draft's catch-up forward runs; the draft collects the
            # retrieval tree right after that forward.
            future = self._pool.submit(self._retrieve, budget)
            self.last_drafted = True
            return self.draft.propose(budget, seed=future.result)
        seed = self._retrieve(budget)
        if self.draft is None:
            self.last_drafted = False
            return (
                self.planner.trim(seed, time.perf_counter() - start, max_nodes=budget)
                if self.planner
                else seed
            )
        if self.planner is not None and not self.planner.should_draft(seed, self.step):
            self.last_drafted = False
            return self.planner.trim(seed, time.perf_counter() - start, max_nodes=budget)
        self.last_drafted = True
        return self.draft.propose(budget, seed=seed, sunk_seconds=time.perf_counter() - start)

    def advance(self, tokens: Sequence[int]) -> None:
        for r in self.retrievers:
            r.advance(tokens)
        if self.draft is not None:
            self.draft.advance(tokens)
