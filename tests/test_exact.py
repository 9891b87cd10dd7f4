"""rasd.ralmspec.exact.ExactL2Index against a plain float64 reference: the same ids, in the same order, for
every query alone and in a batch (ties broken by the smaller id), on random stores built to have ties and
near-ties, across block boundaries, memory-mapped keys, and N < k; batches on both products (the native
small-GEMM kernel and torch's)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from rasd import _core
from rasd.ralmspec.exact import ExactL2Index, sq_dist64


def _reference(keys: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    out = np.full((len(queries), k), -1, dtype=np.int64)
    ids = np.arange(len(keys))
    for j, x in enumerate(queries):
        best = np.lexsort((ids, sq_dist64(keys, x)))[:k]
        out[j, : len(best)] = best
    return out


@pytest.mark.parametrize("first_pass", ["fp32", "bf16"])
@pytest.mark.parametrize("seed", range(6))
def test_search_equals_the_float64_reference_alone_and_in_batches(seed, first_pass):
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
    # fp32: 12 queries take the native kernel's product; 70 (seeds 4, 5) torch's. bf16: both are torch's,
    # with one query padded to two.
    queries = np.concatenate(
        [keys[rng.integers(0, n, size=5)], rng.standard_normal((7 if seed < 4 else 65, d)).astype(np.float32)]
    )
    index = ExactL2Index(keys, block_rows=int(rng.integers(1, 2000)), first_pass=first_pass)
    assert index.first_pass == first_pass
    ref = _reference(keys, queries, k)
    assert np.array_equal(index.search(queries, k), ref)
    for j in range(len(queries)):  # a query's answer does not depend on the rest of its batch
        assert np.array_equal(index.search(queries[j : j + 1], k), ref[j : j + 1])


def test_bf16_pass_is_exact_where_bfloat16_cannot_tell_keys_apart():
    # Keys that agree in their first 8 significant bits everywhere (one bfloat16 value per coordinate), so the
    # first pass sees ties among all of them; plus a large common offset (float32 cancellation).
    rng = np.random.default_rng(11)
    base = np.float32(1000.0) + rng.standard_normal(64).astype(np.float32)
    keys = (base[None, :] * (1 + rng.uniform(-(2.0**-10), 2.0**-10, (4000, 64)))).astype(np.float32)
    queries = np.concatenate([keys[:3], base[None, :], (base * np.float32(1.0005))[None, :]])
    index = ExactL2Index(keys, block_rows=512, first_pass="bf16")
    assert np.array_equal(index.search(queries, 12), _reference(keys, queries, 12))


def test_bf16_pass_falls_back_where_bfloat16_could_overflow():
    keys = np.full((50, 4), 1e19, np.float32)
    keys[::2] *= -1
    index = ExactL2Index(keys, first_pass="bf16")
    assert index.first_pass == "fp32"
    query = np.zeros((1, 4), np.float32)
    assert np.array_equal(index.search(query, 3), _reference(keys, query, 3))


def test_bf16_index_searched_from_another_thread_gives_the_same_answer():
    # (an asynchronous verification's worker: it takes the float32 pass, see ExactL2Index.search)
    rng = np.random.default_rng(8)
    keys = rng.standard_normal((3000, 24)).astype(np.float32)
    queries = rng.standard_normal((5, 24)).astype(np.float32)
    index = ExactL2Index(keys, block_rows=700, first_pass="bf16")
    with ThreadPoolExecutor(max_workers=1) as pool:
        from_worker = pool.submit(index.search, queries, 9).result()
    assert np.array_equal(from_worker, _reference(keys, queries, 9))
    assert np.array_equal(index.search(queries, 9), from_worker)


def test_auto_measures_and_gives_the_same_answer():
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((70000, 32)).astype(np.float32)
    queries = rng.standard_normal((3, 32)).astype(np.float32)
    index = ExactL2Index(keys)
    assert index.first_pass in ("fp32", "bf16")
    assert ExactL2Index(keys[:1000]).first_pass == "fp32"  # too few keys to be worth a copy
    assert np.array_equal(index.search(queries, 8), _reference(keys, queries, 8))


def test_native_scan_equals_a_python_reference():
    rng = np.random.default_rng(3)
    for _ in range(50):
        rows, ld = int(rng.integers(0, 300)), int(rng.choice([*range(1, 20), 32, 48]))  # 16 m: vector path
        nq = int(rng.integers(0, ld + 1))
        dots32 = (rng.standard_normal((rows, ld)) * 10).astype(np.float32)
        dots = (dots32.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bit patterns (truncated)
        key_sq = rng.uniform(0, 50, rows).astype(np.float32)
        query_sq = rng.uniform(0, 50, nq).astype(np.float32)
        limit = rng.uniform(0, 80, nq).astype(np.float32)
        got_rows, got_q, got_val = _core.bf16_distance_scan(dots, nq, key_sq, query_sq, limit)
        as32 = (dots.astype(np.uint32) << 16).view(np.float32)[:, :nq]
        approx = (key_sq[:, None] + query_sq[None, :]) - np.float32(2.0) * as32
        want_rows, want_q = np.nonzero(approx <= limit[None, :])  # row-major, as the scan
        assert np.array_equal(got_rows, want_rows) and np.array_equal(got_q, want_q)
        assert np.array_equal(got_val, approx[want_rows, want_q])
    with pytest.raises(ValueError, match="nq"):
        _core.bf16_distance_scan(
            np.zeros((2, 3), np.uint16), 4, np.zeros(2, np.float32), *[np.zeros(4, np.float32)] * 2
        )
    with pytest.raises(ValueError, match="bf16"):
        _core.bf16_distance_scan(
            np.zeros((2, 3), np.float32), 1, np.zeros(2, np.float32), *[np.zeros(1, np.float32)] * 2
        )


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
    with pytest.raises(ValueError, match="first_pass must be one of 'auto', 'fp32', 'bf16'"):
        ExactL2Index(keys, first_pass="fp16")
    with pytest.raises(ValueError, match="k must be"):
        ExactL2Index(keys).search(keys, 0)
    with pytest.raises(ValueError, match=r"queries must be \[q, 3\]"):
        ExactL2Index(keys).search(np.zeros((2, 4), np.float32), 1)
