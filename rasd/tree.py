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

Everything built on trees lives here and only here: the growable :class:`TreeBuilder` (fusion and the
draft model's expansion), the attention mask and positions of any forward over tree nodes
(:func:`attention_inputs`, for the target's verification and the draft model), path probabilities
(:func:`path_products`) and the best-first order a budget takes nodes in (:func:`best_first_order`).
"""

from __future__ import annotations

import collections
import enum
import heapq
import itertools
import math
from collections.abc import Sequence
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
    RECYCLE = 8  # token recycling (the target's own top-k successors from earlier verifications)


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

    def match_depth(self, tokens: Sequence[int]) -> int:
        """How many leading ``tokens`` the tree holds as one chain from the root (0 if none)."""
        node, depth = -1, 0
        for token in tokens:
            kids = np.flatnonzero((self.parents == node) & (self.tokens == token))
            if not len(kids):
                break
            node, depth = int(kids[0]), depth + 1
        return depth

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


def path_products(parents: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """float64 [N]: the product of ``probs`` along each node's root path (node included).

    parents: int [N] in topological order (-1 = child of the root). The one place a path probability
    (draft model, acceptance estimate, planner) is computed from per-node probabilities.
    """
    probs = np.asarray(probs, dtype=np.float64)
    out = np.empty(len(probs))
    for i, p in enumerate(np.asarray(parents).tolist()):
        out[i] = probs[i] * (out[p] if p >= 0 else 1.0)
    return out


def best_first_order(parents: Sequence[int] | np.ndarray, path_probs: np.ndarray) -> list[int]:
    """Nodes in the order a budget should take them: highest path probability first, never a node before
    its parent or before its previous sibling (sibling order is the verifier's try order, and sampled
    siblings must stay a prefix of their draws). Every prefix of the order is ancestor-closed."""
    parents = np.asarray(parents).tolist()
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, p in enumerate(parents):
        children[p + 1].append(i)
    next_sibling = [-1] * len(parents)
    for kids in children:
        for a, b in itertools.pairwise(kids):
            next_sibling[a] = b
    heap = [(-path_probs[children[0][0]], children[0][0])] if children[0] else []
    order = []
    while heap:
        _, node = heapq.heappop(heap)
        order.append(node)
        for nxt in (children[node + 1][0] if children[node + 1] else -1, next_sibling[node]):
            if nxt >= 0:
                heapq.heappush(heap, (-path_probs[nxt], nxt))
    return order


def sampled_closure(tree: TokenTree) -> np.ndarray:
    """bool [N]: the nodes drawn from a draft distribution (``q_rows >= 0``) and all their ancestors.

    A trim must keep these. Sampling acceptance tries the j-th sampled sibling as the j-th draw without
    replacement *whatever was drawn*; a trim that ranks nodes by their own estimates keeps a draw or not
    depending on its value, and the output is then no longer the target's distribution (measured: a tiny
    draft's 15-node trees cut to 10 by best-first order, chi-square p = 1e-11 on the first token)."""
    keep = np.asarray(tree.q_rows) >= 0
    if keep.any():
        parents = tree.parents.tolist()
        for i in range(len(parents) - 1, -1, -1):  # parents precede children: one backward pass
            if keep[i] and parents[i] >= 0:
                keep[parents[i]] = True
    return keep


def keep_first(tree: TokenTree, order: Sequence[int], count: int) -> TokenTree:
    """The subtree of the first ``count`` nodes of ``order`` (an order from :func:`best_first_order`),
    plus every sampled node and its ancestors (:func:`sampled_closure`): only deterministic candidates are
    ever cut, so a sampled tree may keep more than ``count`` nodes."""
    if count >= len(tree):
        return tree
    keep = sampled_closure(tree)
    keep[np.asarray(order[:count], dtype=np.int64)] = True
    return tree if keep.all() else tree.subtree(keep)


class TreeBuilder:
    """A growable tree of candidates, merged by longest-prefix matching: adding a token under a parent
    that already has that child returns the existing node. Used by fusion (:func:`rasd.drafting.fusion.
    merge_trees`) and by the draft model while it expands its tree.

    A merged node keeps every source bit, the highest score and match length, and the first known draft
    probability. Nodes get indices in insertion order (parents always before children).
    """

    def __init__(self) -> None:
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.sources: list[int] = []
        self.scores: list[float] = []
        self.draft_probs: list[float] = []
        self.match_lengths: list[int] = []
        self.q_rows: list[int] = []
        self.draws: list[int] = []  # order among sampled siblings (draws without replacement), -1 if none
        self.depths: list[int] = []
        self.children: dict[int, dict[int, int]] = {-1: {}}  # node -> token -> child, insertion order

    def __len__(self) -> int:
        return len(self.tokens)

    def add(
        self,
        token: int,
        parent: int,
        source: int,
        score: float,
        draft_prob: float = math.nan,
        match_length: int = 0,
    ) -> int:
        """The node for ``token`` under ``parent`` (-1 = the root), created or merged; returns its index."""
        existing = self.children[parent].get(token)
        if existing is not None:
            self.sources[existing] |= source
            self.scores[existing] = max(self.scores[existing], score)
            self.match_lengths[existing] = max(self.match_lengths[existing], match_length)
            if math.isnan(self.draft_probs[existing]):
                self.draft_probs[existing] = draft_prob
            return existing
        node = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.sources.append(source)
        self.scores.append(score)
        self.draft_probs.append(draft_prob)
        self.match_lengths.append(match_length)
        self.q_rows.append(-1)
        self.draws.append(-1)
        self.depths.append(1 if parent < 0 else self.depths[parent] + 1)
        self.children[parent][token] = node
        self.children[node] = {}
        return node

    def add_tree(self, tree: TokenTree, under: int = -1) -> list[int]:
        """Merge a deterministic ``tree`` below node ``under``; returns the builder index of each of its
        nodes. Sampled nodes (q rows) cannot be merged losslessly and are refused."""
        if (tree.q_rows >= 0).any():
            raise ValueError("only deterministic trees can be merged; sampled draft nodes carry q rows")
        mapped: list[int] = []
        for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True)):
            parent = under if par < 0 else mapped[par]
            mapped.append(
                self.add(
                    tok,
                    parent,
                    int(tree.sources[i]),
                    float(tree.scores[i]),
                    float(tree.draft_probs[i]),
                    int(tree.match_lengths[i]),
                )
            )
        return mapped

    def try_order(self) -> list[int]:
        """Breadth-first, siblings in the verifier's try order: sampled draws first (in draw order), then
        the others by decreasing score."""
        order: list[int] = []
        queue = collections.deque([-1])
        while queue:
            node = queue.popleft()
            kids = list(self.children[node].values())
            sampled = sorted((k for k in kids if self.q_rows[k] >= 0), key=lambda k: self.draws[k])
            rest = sorted((k for k in kids if self.q_rows[k] < 0), key=lambda k: -self.scores[k])
            order += sampled + rest
            queue.extend(sampled + rest)
        return order

    def build(self, q_dists: torch.Tensor | None = None, order: Sequence[int] | None = None) -> TokenTree:
        """The nodes as a :class:`TokenTree`, in ``order`` (default: insertion order; any order that puts
        parents before children). Node ``i`` of the result is builder node ``order[i]``. Without
        ``q_dists`` the result is a structural view in which sampled nodes appear deterministic (for masks
        and estimates; never for verification)."""
        idx = np.arange(len(self), dtype=np.int64) if order is None else np.asarray(order, dtype=np.int64)
        remap = np.full(len(self) + 1, -1, dtype=np.int32)  # remap[p + 1] = new index of builder node p
        remap[idx + 1] = np.arange(len(idx), dtype=np.int32)
        parents = np.asarray(self.parents, dtype=np.int64)[idx] if len(idx) else np.zeros(0, np.int64)

        def column(values: list, dtype) -> np.ndarray:
            return np.asarray(values, dtype=dtype)[idx] if len(idx) else np.zeros(0, dtype)

        return TokenTree(
            column(self.tokens, np.int32),
            remap[parents + 1],
            scores=column(self.scores, np.float32),
            sources=column(self.sources, np.uint8),
            draft_probs=column(self.draft_probs, np.float32),
            match_lengths=column(self.match_lengths, np.int32),
            q_rows=column(self.q_rows, np.int32) if q_dists is not None else None,
            q_dists=q_dists,
        )


def attention_inputs(
    tree: TokenTree,
    past: int,
    *,
    chain: int = 1,
    feed: Sequence[int] | None = None,
    slots: Sequence[int] | None = None,
    cached: int | None = None,
    dtype: torch.dtype,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention mask and position ids for one forward over committed tokens followed by tree nodes: the
    one place a tree mask is built, for the target's verification and for the draft model alike.

    KV layout: ``[0, past)`` committed tokens already cached; ``[past, cached)`` tree nodes cached by
    earlier forwards (node i at ``slots[i]``); then this forward's queries, appended in order: ``chain``
    committed tokens (causal among themselves; the last one is the root, the tree's parent), then the
    nodes ``feed`` (default: all nodes). A committed token attends to the past and the chain up to itself;
    a node attends to the past, the whole chain, its ancestors (wherever cached) and itself, nothing else.
    Node i sits at position ``past + chain - 1 + depth(i)``.

    Verification is ``chain=1`` (the root) with every node fed; the draft model's catch-up feeds its
    pending committed tokens (``chain``) and a few retrieval nodes; its expansions feed ``chain=0``.

    Returns ``mask`` [1, 1, Q, K] with Q = chain + len(feed), K = cached + Q, additive (0 where attending,
    the dtype's minimum elsewhere: the form ``eager`` and ``sdpa`` attention accept), and
    ``position_ids`` [1, Q].
    """
    import torch

    cached = past if cached is None else cached
    feed = list(range(len(tree))) if feed is None else list(feed)
    where = np.full(len(tree), -1, dtype=np.int64) if slots is None else np.array(slots, dtype=np.int64)
    q = chain + len(feed)
    base = cached + chain
    where[np.asarray(feed, dtype=np.int64)] = base + np.arange(len(feed))
    allowed = np.zeros((q, cached + q), dtype=bool)
    allowed[:, :past] = True
    allowed[:chain, cached:base] = np.tri(chain, dtype=bool)
    allowed[chain:, cached:base] = True
    if feed:
        anc = tree.ancestor_matrix()[feed]  # [F, N]: the fed node itself and its ancestors
        if (where[anc.nonzero()[1]] < 0).any():
            raise ValueError("a fed node's ancestor is neither cached nor fed in this forward")
        rows, cols = anc.nonzero()
        allowed[chain + rows, where[cols]] = True
    mask = torch.zeros((1, 1, q, cached + q), dtype=dtype, device=device)
    # The committed past is always visible: only the block after it crosses to the device.
    blocked = torch.from_numpy(np.ascontiguousarray(~allowed[:, past:])).to(device)
    mask[0, 0, :, past:].masked_fill_(blocked, torch.finfo(dtype).min)
    depths = tree.depths[feed] if feed else np.zeros(0, np.int32)
    positions = np.concatenate([past + np.arange(chain), past + chain - 1 + depths]).astype(np.int64)
    return mask, torch.from_numpy(positions).to(device)[None]


def tree_attention_inputs(
    tree: TokenTree, past_length: int, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Verification's case of :func:`attention_inputs`: ``[root] + tree`` after ``past_length`` cached tokens.

    Returns ``mask`` [1, 1, N + 1, past_length + N + 1] and ``position_ids`` [1, N + 1]
    = past_length + [0, depth_1, ..., depth_N].
    """
    return attention_inputs(tree, past_length, dtype=dtype, device=device)
