"""Token trees: the one tree representation shared by every drafter, the pruner, fusion and the verifier.

A tree of N nodes hangs below the *root*, the last committed token (not part of the tree). Node ``i``
holds ``tokens[i]`` and its parent ``parents[i]`` (``-1`` = child of the root). Nodes are always in
topological order (``-1 <= parents[i] < i``), so a node's ancestors come before it and any prefix of
the arrays is itself a tree.

Sibling order matters for lossless sampling: the verifier tries the children of a node in index order.
A node drawn at random from the draft model's distribution carries ``q_rows[i] >= 0``, the row of
``q_dists`` holding the distribution (over the vocabulary) it was drawn from; sampled siblings that share
a row were drawn *without replacement* in index order, so the proposal distribution of the k-th of them is
that row with the earlier ones removed. Every other node (retrieval, or a draft token picked by top-k)
is a deterministic candidate (``q_rows[i] == -1``, i.e. q = 1).

Everything the verifier needs (4D attention mask, position ids, root-to-leaf paths) is derived here and
only here.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from rasd import _core

if TYPE_CHECKING:
    import torch


class Source(enum.IntFlag):
    """Which drafter proposed a node. A bit mask: after fusion a node can have several sources."""

    NONE = 0
    PROMPT = 1  # dynamic datastore over prompt + generated text (PLD-style)
    CORPUS = 2  # static corpus datastore (REST-style)
    DRAFT = 4  # draft model


@dataclass(frozen=True, eq=False)
class TokenTree:
    """A tree of candidate tokens as parent-pointer arrays.

    tokens:   int32 [N]    candidate token ids.
    parents:  int32 [N]    parent index, -1 for children of the root; -1 <= parents[i] < i.
    scores:   float32 [N]  the drafter's confidence in the node: retrieval count, count ratio or draft
                           probability of the path (used for ranking and pruning, not for acceptance).
    sources:  uint8 [N]    :class:`Source` bit mask per node.
    draft_probs: float32 [N] the draft model's probability of the node given its parent path, NaN where
                           no draft model scored it (used by the planner and the pruner).
    match_lengths: int32 [N] for retrieval nodes, the length of the context suffix the datastore matched
                           (0 otherwise): longer matches are more reliable, the planner calibrates on it.
    q_rows:   int32 [N]    row of ``q_dists`` a sampled node was drawn from, -1 for deterministic nodes.
    q_dists:  float [M, V] draft distributions referenced by ``q_rows`` (a torch tensor), or None.
    """

    tokens: np.ndarray
    parents: np.ndarray
    scores: np.ndarray = field(default=None)  # type: ignore[assignment]
    sources: np.ndarray = field(default=None)  # type: ignore[assignment]
    draft_probs: np.ndarray = field(default=None)  # type: ignore[assignment]
    match_lengths: np.ndarray = field(default=None)  # type: ignore[assignment]
    q_rows: np.ndarray = field(default=None)  # type: ignore[assignment]
    q_dists: torch.Tensor | None = None

    def __post_init__(self) -> None:
        tokens = np.ascontiguousarray(self.tokens, dtype=np.int32).reshape(-1)
        parents = np.ascontiguousarray(self.parents, dtype=np.int32).reshape(-1)
        n = tokens.shape[0]
        if parents.shape[0] != n:
            raise ValueError(f"tokens has {n} nodes but parents has {parents.shape[0]}")
        if n and tokens.min() < 0:
            raise ValueError("token ids must be non-negative")

        def column(value, dtype, default):
            arr = (
                np.full(n, default, dtype=dtype)
                if value is None
                else np.ascontiguousarray(value, dtype=dtype)
            )
            if arr.shape != (n,):
                raise ValueError(f"per-node arrays must have shape ({n},), got {arr.shape}")
            return arr

        object.__setattr__(self, "tokens", tokens)
        object.__setattr__(self, "parents", parents)
        object.__setattr__(self, "scores", column(self.scores, np.float32, 1.0))
        object.__setattr__(self, "sources", column(self.sources, np.uint8, 0))
        object.__setattr__(self, "draft_probs", column(self.draft_probs, np.float32, np.nan))
        object.__setattr__(self, "match_lengths", column(self.match_lengths, np.int32, 0))
        object.__setattr__(self, "q_rows", column(self.q_rows, np.int32, -1))
        # Validates the topological order (ValueError from the native core) and caches depths.
        object.__setattr__(self, "_depths", _core.tree_depths(parents))
        if (self.q_rows >= 0).any():
            if self.q_dists is None or self.q_dists.ndim != 2:
                raise ValueError("sampled nodes (q_rows >= 0) need q_dists of shape [M, V]")
            if self.q_rows.max() >= self.q_dists.shape[0]:
                raise ValueError(f"q_rows refers to row {self.q_rows.max()} of {self.q_dists.shape[0]}")

    @classmethod
    def empty(cls) -> TokenTree:
        return cls(np.zeros(0, np.int32), np.zeros(0, np.int32))

    @classmethod
    def chain(cls, tokens, source: Source = Source.NONE, scores=None) -> TokenTree:
        """A single path: ``tokens[0]`` is a child of the root, each next token a child of the previous."""
        tokens = np.asarray(tokens, dtype=np.int32).reshape(-1)
        parents = np.arange(-1, len(tokens) - 1, dtype=np.int32)
        return cls(tokens, parents, scores=scores, sources=np.full(len(tokens), int(source), np.uint8))

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def depths(self) -> np.ndarray:
        """int32 [N]: 1 for children of the root."""
        return self._depths  # type: ignore[attr-defined]

    @property
    def max_depth(self) -> int:
        return int(self.depths.max()) if len(self) else 0

    def children(self) -> list[list[int]]:
        """children()[p + 1] lists the children of node p in try order (index 0 is the root)."""
        out: list[list[int]] = [[] for _ in range(len(self) + 1)]
        for i, p in enumerate(self.parents.tolist()):
            out[p + 1].append(i)
        return out

    def ancestor_matrix(self) -> np.ndarray:
        """bool [N, N]: ``A[i, j]`` iff j is i or an ancestor of i."""
        n = len(self)
        anc = np.zeros((n, n), dtype=bool)
        for i, p in enumerate(self.parents.tolist()):
            if p >= 0:
                anc[i, : p + 1] = anc[p, : p + 1]
            anc[i, i] = True
        return anc

    def paths(self) -> list[list[int]]:
        """Root-to-leaf paths as lists of node indices, leaves in index order."""
        is_parent = np.zeros(len(self), dtype=bool)
        is_parent[self.parents[self.parents >= 0]] = True
        out = []
        for leaf in np.flatnonzero(~is_parent).tolist():
            path = []
            node = leaf
            while node >= 0:
                path.append(node)
                node = int(self.parents[node])
            out.append(path[::-1])
        return out

    def subtree(self, keep: np.ndarray) -> TokenTree:
        """The tree restricted to the nodes with ``keep[i]`` True (must be closed under ancestors)."""
        keep = np.asarray(keep, dtype=bool)
        idx = np.flatnonzero(keep)
        remap = np.full(len(self) + 1, -1, dtype=np.int32)  # remap[p + 1] = new index of p
        remap[idx + 1] = np.arange(len(idx), dtype=np.int32)
        old_parents = self.parents[idx]
        if np.any((old_parents >= 0) & ~keep[np.maximum(old_parents, 0)]):
            raise ValueError("subtree: the kept nodes must include every kept node's ancestors")
        return TokenTree(
            self.tokens[idx],
            remap[old_parents + 1],
            scores=self.scores[idx],
            sources=self.sources[idx],
            draft_probs=self.draft_probs[idx],
            match_lengths=self.match_lengths[idx],
            q_rows=self.q_rows[idx],
            q_dists=self.q_dists,
        )


def tree_attention_inputs(
    tree: TokenTree, past_length: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids for one verification forward of ``[root] + tree``.

    The KV cache holds ``past_length`` tokens; the root (the last committed token, whose KV is not cached
    yet) is fed as query 0 followed by the N tree nodes. Query 0 attends to the past and itself; node i
    attends to the past, the root, itself and its ancestors, nothing else.

    Returns ``mask`` [1, 1, N + 1, past_length + N + 1], additive (0 where attending, the dtype's minimum
    elsewhere: the form both ``eager`` and ``sdpa`` attention accept), and ``position_ids`` [1, N + 1]
    = past_length + [0, depth_1, ..., depth_N].
    """
    import torch

    n = len(tree)
    allowed = np.zeros((n + 1, past_length + n + 1), dtype=bool)
    allowed[:, : past_length + 1] = True
    allowed[1:, past_length + 1 :] = tree.ancestor_matrix()
    mask = torch.zeros((1, 1, n + 1, past_length + n + 1), dtype=dtype, device=device)
    mask.masked_fill_(torch.from_numpy(~allowed).to(device)[None, None], torch.finfo(dtype).min)
    depths = np.concatenate([[0], tree.depths]).astype(np.int64)
    positions = torch.from_numpy(depths + past_length).to(device)[None]
    return mask, positions
