"""TokenTree derivations (mask, positions, paths, subtrees) against naive references."""

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rasd.tree import (
    Source,
    TokenTree,
    TreeBuilder,
    attention_inputs,
    best_first_order,
    path_products,
    tree_attention_inputs,
)


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


@given(trees(max_nodes=16), st.integers(0, 6), st.integers(0, 4), st.data())
@settings(max_examples=80, deadline=None)
def test_general_mask_matches_reference(tree, past, chain, data):
    """attention_inputs for any forward: committed chain tokens, some nodes cached by earlier forwards
    (at scattered slots beyond the past), the rest of an ancestor-closed set fed now."""
    n = len(tree)
    parents = tree.parents.tolist()
    # An ancestor-closed prefix set is "cached", the next ancestor-closed layer is fed now.
    closed: set[int] = set()
    for i in range(n):
        if (parents[i] < 0 or parents[i] in closed) and data.draw(st.booleans()):
            closed.add(i)
    cached_nodes = sorted(closed)
    feed = [i for i in range(n) if i not in closed and (parents[i] < 0 or parents[i] in closed)]
    extra = data.draw(st.integers(0, 3))  # unrelated cached entries between the past and the tree slots
    slots = [-1] * n
    for j, node in enumerate(cached_nodes):
        slots[node] = past + extra + j
    cached = past + extra + len(cached_nodes)
    if chain == 0 and not feed:
        return
    mask, pos = attention_inputs(
        tree, past, chain=chain, feed=feed, slots=slots, cached=cached, dtype=torch.float32
    )
    q = chain + len(feed)
    assert mask.shape == (1, 1, q, cached + q) and pos.shape == (1, q)
    seen = (mask[0, 0] == 0).numpy()
    where = list(slots)
    for j, node in enumerate(feed):
        where[node] = cached + chain + j
    for r in range(chain):
        assert set(np.flatnonzero(seen[r]).tolist()) == set(range(past)) | {cached + c for c in range(r + 1)}
        assert pos[0, r] == past + r
    for j, node in enumerate(feed):
        expected = set(range(past)) | {cached + c for c in range(chain)}
        expected |= {where[a] for a in _ancestors(parents, node)}
        assert set(np.flatnonzero(seen[chain + j]).tolist()) == expected
        assert pos[0, chain + j] == past + chain - 1 + len(_ancestors(parents, node))


def test_mask_refuses_a_node_whose_ancestor_was_never_fed():
    tree = TokenTree([5, 6], [-1, 0])
    with pytest.raises(ValueError, match="ancestor"):
        attention_inputs(tree, 3, chain=0, feed=[1], dtype=torch.float32)


@given(trees(), st.data())
@settings(max_examples=60, deadline=None)
def test_best_first_order_is_ancestor_and_sibling_closed_and_greedy(tree, data):
    probs = np.array(data.draw(st.lists(st.floats(0, 1), min_size=len(tree), max_size=len(tree))))
    path = path_products(tree.parents, probs)
    order = best_first_order(tree.parents, path)
    assert sorted(order) == list(range(len(tree)))
    position = {node: i for i, node in enumerate(order)}
    kids = tree.children()
    for node in range(len(tree)):
        parent = int(tree.parents[node])
        if parent >= 0:
            assert position[parent] < position[node]
        siblings = kids[parent + 1]
        k = siblings.index(node)
        if k:
            assert position[siblings[k - 1]] < position[node]
    # path products: each node = its probability times its parent's path
    for i, p in enumerate(tree.parents.tolist()):
        assert path[i] == pytest.approx(probs[i] * (path[p] if p >= 0 else 1.0))


def test_builder_merges_by_longest_prefix_and_orders_siblings_for_the_verifier():
    b = TreeBuilder()
    a = b.add(7, -1, int(Source.PROMPT), 0.5, match_length=3)
    c = b.add(8, a, int(Source.PROMPT), 0.4)
    assert b.add(7, -1, int(Source.DRAFT), 0.9, draft_prob=0.8) == a  # merged, not duplicated
    d = b.add(9, -1, int(Source.CORPUS), 0.95)
    assert b.sources[a] == Source.PROMPT | Source.DRAFT and b.scores[a] == 0.9
    assert b.draft_probs[a] == pytest.approx(0.8) and b.match_lengths[a] == 3
    assert b.depths == [1, 2, 1]
    order = b.try_order()
    assert order == [d, a, c]  # siblings by decreasing score, breadth first
    tree = b.build(order=order)
    assert tree.tokens.tolist() == [9, 7, 8] and tree.parents.tolist() == [-1, -1, 1]
    merged = TreeBuilder()
    mapped = merged.add_tree(tree)
    assert merged.add_tree(TokenTree([7, 10], [-1, 0], sources=[int(Source.CORPUS)] * 2))[0] == mapped[1]
    with pytest.raises(ValueError, match="deterministic"):
        TreeBuilder().add_tree(TokenTree([1], [-1], q_rows=[0], q_dists=torch.ones(1, 4) / 4))
