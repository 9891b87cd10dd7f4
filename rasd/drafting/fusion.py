"""Tree fusion by longest-prefix matching.

Trees proposed by different sources (prompt lookup, corpus lookup, draft model) are inserted into one trie:
a node whose root path (sequence of tokens) already exists is merged into the existing node, so only the
unmatched suffixes add nodes. A merged node keeps every source bit, the highest score and match length,
and the first known draft probability. The result is in topological order, the first tree's nodes first.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rasd.tree import TokenTree


def merge_trees(trees: Sequence[TokenTree]) -> TokenTree:
    """Fuse ``trees`` (deterministic candidates only; sampled nodes cannot be merged losslessly)."""
    tokens: list[int] = []
    parents: list[int] = []
    scores: list[float] = []
    sources: list[int] = []
    draft_probs: list[float] = []
    match_lengths: list[int] = []
    index: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node
    for tree in trees:
        if (tree.q_rows >= 0).any():
            raise ValueError("merge_trees takes deterministic trees; sampled draft nodes carry q rows")
        remap = np.empty(len(tree), dtype=np.int64)
        for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True)):
            parent = -1 if par < 0 else int(remap[par])
            key = (parent, tok)
            node = index.get(key)
            if node is None:
                node = len(tokens)
                index[key] = node
                tokens.append(tok)
                parents.append(parent)
                scores.append(float(tree.scores[i]))
                sources.append(int(tree.sources[i]))
                draft_probs.append(float(tree.draft_probs[i]))
                match_lengths.append(int(tree.match_lengths[i]))
            else:
                scores[node] = max(scores[node], float(tree.scores[i]))
                sources[node] |= int(tree.sources[i])
                if np.isnan(draft_probs[node]):
                    draft_probs[node] = float(tree.draft_probs[i])
                match_lengths[node] = max(match_lengths[node], int(tree.match_lengths[i]))
            remap[i] = node
    return TokenTree(
        tokens, parents, scores=scores, sources=sources, draft_probs=draft_probs, match_lengths=match_lengths
    )
