"""Token Recycling (Luo et al., "Turning Trash into Treasure", ACL 2025): drafts from the target's logits.

Every verification already computes the target's distribution after the root and after every tree node,
accepted or not. Their top-k tokens are the likeliest successors of that node's token. The drafter keeps,
per vocabulary token, the latest top-k successors the target gave it (an adjacency table ``[V, k]`` of
int32, 4.9 MB for Qwen's 151,936 tokens at k = 8, overwritten from every step's logits, rejected nodes
included) and proposes a tree by expanding from the last committed token through the table, best first by
the product of rank priors, wide near the root and narrower deeper (``RecyclingConfig.widths``). It costs a
table lookup per node: no model forward, no corpus. The table persists across requests of one generator,
so later requests start warm.

Nodes carry :attr:`rasd.tree.Source.RECYCLE` and a score that is the prior acceptance of their rank (the
planner learns the real acceptance per rank bin online).
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np

from rasd.drafting.base import DraftContext, Proposal, StepBudget, StepResult
from rasd.tree import Source, TokenTree


@dataclass(frozen=True)
class RecyclingConfig:
    """k: successors kept per token (the paper keeps 8).
    widths: children taken per node at depth 1, 2, ... (a static template, wide near the root; the last
        entry repeats). The paper's tree is wider; on a CPU the planner keeps few nodes, so the template
        only needs to offer the likely ones.
    max_depth: tokens per path at most.
    rank_prior: the prior acceptance of the successor of each rank (top-1 first), the node's score until
        the planner has learned better; the last entry repeats.
    """

    k: int = 8
    widths: tuple[int, ...] = (8, 4, 2, 2, 1)
    max_depth: int = 8
    rank_prior: tuple[float, ...] = (0.55, 0.2, 0.1, 0.06, 0.04, 0.03, 0.02, 0.02)

    def __post_init__(self) -> None:
        if self.k < 1 or self.max_depth < 1:
            raise ValueError("k and max_depth must be >= 1")
        if not self.widths or min(self.widths) < 1 or max(self.widths) > self.k:
            raise ValueError(f"widths must be non-empty, each in [1, k={self.k}], got {self.widths}")
        if not self.rank_prior or not all(0 < p <= 1 for p in self.rank_prior):
            raise ValueError("rank_prior must be non-empty probabilities in (0, 1]")


class TokenRecycling:
    """Drafter proposing trees from the table of the target's top-k successors (see the module docstring).

    vocab_size: the target's vocabulary (rows of the table).
    """

    # Beside a draft model (rasd.drafting.fused), these trees join only the steps the draft does not
    # expand: in its seed their breadth-first candidates displaced the draft's own (measured: fused.py).
    seeds_draft = False

    def __init__(self, vocab_size: int, config: RecyclingConfig | None = None) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        self.config = config or RecyclingConfig()
        self.table = np.full((vocab_size, self.config.k), -1, dtype=np.int32)  # -1 = nothing learned yet
        self.last = -1  # the last committed token (the next tree's root)

    def begin(self, context: DraftContext) -> None:
        self.last = int(context.prompt[-1])
        # Warm start: a token the target has not been seen continuing yet gets the successor it has in the
        # prompt (rows the target filled are never overwritten by the prompt). The root's row is otherwise
        # empty until the token has been fed through the target once.
        prompt = np.asarray(context.prompt, dtype=np.int64)
        if len(prompt) > 1:
            first, then = prompt[:-1], prompt[1:]
            ok = (first < len(self.table)) & (then < len(self.table))
            first, then = first[ok], then[ok]
            empty = self.table[first, 0] < 0
            self.table[first[empty], 0] = then[empty]

    def _prior(self, rank: int) -> float:
        prior = self.config.rank_prior
        return prior[min(rank, len(prior) - 1)]

    def _width(self, depth: int) -> int:
        widths = self.config.widths
        return widths[min(depth - 1, len(widths) - 1)]

    def propose(self, budget: StepBudget) -> Proposal:
        start = time.perf_counter()
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        heap: list[
            tuple[float, int, int, int, int, float]
        ] = []  # (-path, order, token, parent, depth, score)
        counter = 0

        def push_children(token: int, parent: int, depth: int, path: float) -> None:
            nonlocal counter
            if depth > self.config.max_depth or not 0 <= token < len(self.table):
                return
            for rank, child in enumerate(self.table[token, : self._width(depth)].tolist()):
                if child < 0:
                    break
                score = self._prior(rank)
                heapq.heappush(heap, (-path * score, counter, child, parent, depth, score))
                counter += 1

        push_children(self.last, -1, 1, 1.0)
        while heap and len(tokens) < budget.max_nodes:
            neg_path, _, token, parent, depth, score = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            scores.append(score)
            push_children(token, len(tokens) - 1, depth + 1, -neg_path)
        tree = TokenTree(
            np.asarray(tokens, dtype=np.int32),
            np.asarray(parents, dtype=np.int32),
            scores=np.asarray(scores, dtype=np.float32),
            sources=np.full(len(tokens), int(Source.RECYCLE), np.uint8),
        )
        return Proposal(tree, retrieval_seconds=time.perf_counter() - start)

    def advance(self, step: StepResult) -> None:
        top = step.top_tokens(self.config.k)
        if top is not None:
            # Row 0 is what the target predicted after the root (the token committed before this step),
            # row i + 1 after node i, accepted or rejected alike.
            fed = np.concatenate([[self.last], step.tree.tokens]).astype(np.int64)
            ok = (fed >= 0) & (fed < len(self.table))
            self.table[fed[ok]] = top[ok, : self.config.k]
        self.last = int(step.tokens[-1])
