"""Pruning a retrieval tree with the draft model's probabilities (RASD's retrieval-tree pruner).

Rule, exactly:

1. every node gets a *path probability*: the product, along its root path, of the draft model's probability
   of each node given its parent path (``draft_probs``, float [N]; NaN or missing counts as 0);
2. a node is *eligible* if its path probability is >= ``min_path_prob`` and, when ``top_k_per_depth`` is
   set, it is among the ``top_k_per_depth`` highest path probabilities at its depth (ties: lower index);
3. kept = eligible nodes whose ancestors are all eligible (the result is always a tree);
4. if more than ``budget`` nodes remain, the ``budget`` with the highest path probability are kept (ties:
   lower index). A node's path probability never exceeds its parent's, so this stays ancestor-closed.

The pipeline's own selection (:class:`rasd.planner.Planner`) replaces the hand-set thresholds with learned
acceptance and a measured cost model; this function is the explicit, parameterised form of the same idea.
"""

from __future__ import annotations

import numpy as np

from rasd.tree import TokenTree


def path_probabilities(tree: TokenTree, draft_probs: np.ndarray) -> np.ndarray:
    """float64 [N]: product of ``draft_probs`` along each root path (NaN -> 0)."""
    probs = np.nan_to_num(np.asarray(draft_probs, dtype=np.float64), nan=0.0)
    if probs.shape != (len(tree),):
        raise ValueError(f"draft_probs must have shape ({len(tree)},), got {probs.shape}")
    if (probs < 0).any() or (probs > 1 + 1e-6).any():
        raise ValueError("draft_probs must be probabilities in [0, 1]")
    out = np.empty(len(tree))
    for i, p in enumerate(tree.parents.tolist()):
        out[i] = probs[i] * (out[p] if p >= 0 else 1.0)
    return out


def prune(
    tree: TokenTree,
    draft_probs: np.ndarray | None = None,
    *,
    budget: int,
    min_path_prob: float = 0.0,
    top_k_per_depth: int | None = None,
) -> TokenTree:
    """Keep the branches the draft model finds likely (see the module docstring for the exact rule).

    draft_probs: float [N], p_draft(node | parent path); defaults to ``tree.draft_probs``.
    The returned tree carries the draft probabilities in ``draft_probs``.
    """
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    if not 0.0 <= min_path_prob <= 1.0:
        raise ValueError(f"min_path_prob must be in [0, 1], got {min_path_prob}")
    if top_k_per_depth is not None and top_k_per_depth < 1:
        raise ValueError(f"top_k_per_depth must be >= 1, got {top_k_per_depth}")
    probs = tree.draft_probs if draft_probs is None else np.asarray(draft_probs, dtype=np.float32)
    path = path_probabilities(tree, probs)
    n = len(tree)
    eligible = path >= min_path_prob
    if top_k_per_depth is not None:
        depths = tree.depths
        for d in np.unique(depths):
            at = np.flatnonzero(depths == d)
            ranked = at[np.lexsort((at, -path[at]))]
            eligible[ranked[top_k_per_depth:]] = False
    kept = np.zeros(n, dtype=bool)
    for i, p in enumerate(tree.parents.tolist()):
        kept[i] = eligible[i] and (p < 0 or kept[p])
    idx = np.flatnonzero(kept)
    if len(idx) > budget:
        best = idx[np.lexsort((idx, -path[idx]))][:budget]
        kept[:] = False
        kept[best] = True
    with_probs = TokenTree(
        tree.tokens,
        tree.parents,
        scores=tree.scores,
        sources=tree.sources,
        draft_probs=probs,
        q_rows=tree.q_rows,
        q_dists=tree.q_dists,
    )
    return with_probs.subtree(kept)
