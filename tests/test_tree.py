"""TokenTree derivations (mask, positions, paths, subtrees) against naive references."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rasd.tree import Source, TokenTree, tree_attention_inputs


@st.composite
def trees(draw, max_nodes=24):
    n = draw(st.integers(0, max_nodes))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    tokens = draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))
    return TokenTree(tokens, parents)


def _ancestors(parents, i):
    out = {i}
    while parents[i] >= 0:
        i = parents[i]
        out.add(i)
    return out


@given(trees(), st.integers(0, 5))
@settings(max_examples=60, deadline=None)
def test_mask_and_positions_match_reference(tree, past):
    mask, pos = tree_attention_inputs(tree, past, dtype=torch.float32)
    n = len(tree)
    assert mask.shape == (1, 1, n + 1, past + n + 1) and pos.shape == (1, n + 1)
    seen = (mask[0, 0] == 0).numpy()
    parents = tree.parents.tolist()
    for q in range(n + 1):
        expected = set(range(past + 1))
        if q > 0:
            expected |= {past + 1 + a for a in _ancestors(parents, q - 1)}
        assert set(np.flatnonzero(seen[q]).tolist()) == expected
    depth = [0] + [len(_ancestors(parents, i)) for i in range(n)]
    assert pos[0].tolist() == [past + d for d in depth]


@given(trees())
@settings(max_examples=60, deadline=None)
def test_paths_cover_every_node_once_per_leaf(tree):
    paths = tree.paths()
    leaves = [i for i in range(len(tree)) if i not in set(tree.parents.tolist())]
    assert [p[-1] for p in paths] == leaves
    for path in paths:
        assert tree.parents[path[0]] == -1
        assert all(tree.parents[b] == a for a, b in itertools.pairwise(path))
    assert {i for p in paths for i in p} == set(range(len(tree)))


def test_subtree_remaps_parents_and_keeps_columns():
    tree = TokenTree([10, 11, 12, 13], [-1, 0, -1, 2], scores=[4, 3, 2, 1], sources=[1, 1, 2, 2])
    sub = tree.subtree(np.array([True, False, True, True]))
    assert sub.tokens.tolist() == [10, 12, 13]
    assert sub.parents.tolist() == [-1, -1, 1]
    assert sub.scores.tolist() == [4, 2, 1] and sub.sources.tolist() == [1, 2, 2]
    with pytest.raises(ValueError, match="ancestors"):
        tree.subtree(np.array([False, True, False, False]))


def test_chain_and_validation():
    chain = TokenTree.chain([5, 6, 7], Source.PROMPT)
    assert chain.parents.tolist() == [-1, 0, 1] and chain.max_depth == 3
    assert (chain.sources == Source.PROMPT).all()
    assert len(TokenTree.empty()) == 0
    with pytest.raises(ValueError, match="topological"):
        TokenTree([1, 2], [1, -1])
    with pytest.raises(ValueError, match="non-negative"):
        TokenTree([-3], [-1])
    with pytest.raises(ValueError, match="q_dists"):
        TokenTree([1], [-1], q_rows=[0])
