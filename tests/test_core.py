"""The native module builds, imports and exchanges arrays correctly."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import rasd
from rasd import _core


def test_version_matches_package():
    assert _core.__version__ == rasd.__version__


def _reference_depths(parents):
    depths = []
    for p in parents:
        depths.append(1 if p < 0 else depths[p] + 1)
    return depths


@st.composite
def parent_arrays(draw):
    n = draw(st.integers(0, 60))
    return [draw(st.integers(-1, i - 1)) for i in range(n)]


@given(parent_arrays())
def test_tree_depths_matches_reference(parents):
    out = _core.tree_depths(np.asarray(parents, dtype=np.int32))
    assert out.dtype == np.int32
    assert out.tolist() == _reference_depths(parents)


def test_tree_depths_accepts_other_int_dtypes_and_lists():
    assert _core.tree_depths(np.array([-1, 0, 1], dtype=np.int64)).tolist() == [1, 2, 3]
    assert _core.tree_depths([-1, -1, 0]).tolist() == [1, 1, 2]


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 0, 5], [-2]])
def test_tree_depths_rejects_non_topological_parents(parents):
    with pytest.raises(ValueError, match="topological order"):
        _core.tree_depths(np.asarray(parents, dtype=np.int32))


def test_tree_depths_rejects_2d():
    with pytest.raises(ValueError, match="1-D"):
        _core.tree_depths(np.zeros((2, 2), dtype=np.int32))
