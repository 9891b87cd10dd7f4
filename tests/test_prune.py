"""The retrieval-tree pruner against a brute-force reading of its documented rule."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rasd.prune import path_probabilities, prune
from rasd.tree import TokenTree


@st.composite
def trees_with_probs(draw):
    n = draw(st.integers(0, 14))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    probs = draw(st.lists(st.sampled_from([0.0, 0.05, 0.1, 0.25, 0.5, 0.8, 1.0]), min_size=n, max_size=n))
    return TokenTree(list(range(n)), parents), np.array(probs, dtype=np.float32)


def reference(tree, probs, budget, min_path_prob, top_k):
    n = len(tree)
    path = []
    for i, p in enumerate(tree.parents.tolist()):
        path.append(float(probs[i]) * (path[p] if p >= 0 else 1.0))
    depth = tree.depths.tolist()
    eligible = [path[i] >= min_path_prob for i in range(n)]
    if top_k is not None:
        for i in range(n):
            better = [
                j
                for j in range(n)
                if depth[j] == depth[i] and (path[j] > path[i] or (path[j] == path[i] and j < i))
            ]
            if len(better) >= top_k:
                eligible[i] = False

    def ancestors_ok(i):
        while i >= 0:
            if not eligible[i]:
                return False
            i = tree.parents[i]
        return True

    kept = [i for i in range(n) if ancestors_ok(i)]
    kept.sort(key=lambda i: (-path[i], i))
    return sorted(kept[:budget])


@given(
    trees_with_probs(),
    st.integers(0, 15),
    st.sampled_from([0.0, 0.05, 0.2]),
    st.sampled_from([None, 1, 2, 3]),
)
@settings(max_examples=200, deadline=None)
def test_prune_matches_the_documented_rule(tree_probs, budget, min_path_prob, top_k):
    tree, probs = tree_probs
    got = prune(tree, probs, budget=budget, min_path_prob=min_path_prob, top_k_per_depth=top_k)
    assert got.tokens.tolist() == reference(tree, probs, budget, min_path_prob, top_k)  # token i == node i
    assert np.allclose(got.draft_probs, probs[got.tokens])


def test_path_probabilities_and_validation():
    tree = TokenTree([1, 2, 3], [-1, 0, 1])
    assert path_probabilities(tree, np.array([0.5, 0.5, np.nan])).tolist() == [0.5, 0.25, 0.0]
    with pytest.raises(ValueError, match="shape"):
        path_probabilities(tree, np.array([0.5]))
    with pytest.raises(ValueError, match="probabilities"):
        prune(tree, np.array([2.0, 0.5, 0.5]), budget=2)
    with pytest.raises(ValueError, match="budget"):
        prune(tree, np.array([0.5, 0.5, 0.5]), budget=-1)
    assert list(itertools.islice(prune(tree, np.ones(3), budget=2).tokens.tolist(), 5)) == [1, 2]
