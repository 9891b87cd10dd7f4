"""rasd.ralmspec.exact.ExactL2Index against a plain float64 reference: the same ids, in the same order, for
every query alone and in a batch (ties broken by the smaller id), on random stores built to have ties and
near-ties, across block boundaries, memory-mapped keys, and N < k; batches on both products (the native
small-GEMM kernel and torch's)."""

from __future__ import annotations

import numpy as np
import pytest

from rasd.ralmspec.exact import ExactL2Index, sq_dist64


def _reference(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(queries), k), -1, dtype=np.int64)
    ids = np.arange(len(keys))
    for j, x in enumerate(queries):
        best = np.lexsort((ids, sq_dist64(keys, x)))[:k]
        out[j, : len(best)] = best
    return out


@pytest.mark.parametrize("seed", range(6))
def test_search_equals_the_float64_reference_alone_and_in_batches(seed):
    rng = np.random.default_rng(seed)
    n, d, k = int(rng.integers(1, 5000)), int(rng.integers(1, 80)), int(rng.integers(1, 40))
    keys = rng.standard_normal((n, d)).astype(np.float32) * np.float32(rng.choice([1e-3, 1.0, 300.0]))
    if seed % 2:  # a large common offset: |y|^2 - 2x.y + |x|^2 cancels catastrophically in float32
        keys += np.float32(rng.choice([50.0, 1000.0]))
    # exact duplicates (ties) and near-duplicates one float32 ulp away (where float32 matmuls misrank)
    dup = rng.integers(0, n, size=n // 5)
    keys[rng.integers(0, n, size=len(dup))] = keys[dup]
    near = rng.integers(0, n, size=n // 10)
    keys[near] = np.nextafter(keys[near], np.float32(np.inf))
    # 12 queries take the native kernel's product; 70 (seeds 4, 5) torch's.
    queries = np.concatenate(
        [keys[rng.integers(0, n, size=5)], rng.standard_normal((7 if seed < 4 else 65, d)).astype(np.float32)]
    )
    index = ExactL2Index(keys, block_rows=int(rng.integers(1, 2000)))
    ref = _reference(keys, queries, k)
    assert np.array_equal(index.search(queries, k), ref)
    for j in range(len(queries)):  # a query's answer does not depend on the rest of its batch
        assert np.array_equal(index.search(queries[j : j + 1], k), ref[j : j + 1])


def test_memory_mapped_keys_and_fewer_keys_than_k(tmp_path):
    rng = np.random.default_rng(7)
    keys = rng.standard_normal((300, 16)).astype(np.float32)
    path = tmp_path / "keys.npy"
    np.save(path, keys)
    mapped = np.load(path, mmap_mode="r")
    queries = rng.standard_normal((4, 16)).astype(np.float32)
    assert np.array_equal(
        ExactL2Index(mapped, block_rows=64).search(queries, 10), _reference(keys, queries, 10)
    )
    small = ExactL2Index(keys[:3])
    out = small.search(queries, 5)
    assert np.array_equal(out[:, :3], _reference(keys[:3], queries, 3)) and (out[:, 3:] == -1).all()


def test_bad_input_is_named():
    keys = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="float32"):
        ExactL2Index(keys.astype(np.float64))
    with pytest.raises(ValueError, match="block_rows"):
        ExactL2Index(keys, block_rows=0)
    with pytest.raises(ValueError, match="k must be"):
        ExactL2Index(keys).search(keys, 0)
    with pytest.raises(ValueError, match=r"queries must be \[q, 3\]"):
        ExactL2Index(keys).search(np.zeros((2, 4), np.float32), 1)
