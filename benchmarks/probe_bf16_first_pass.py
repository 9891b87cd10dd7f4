"""Probe (not a contender): could a bf16 first pass make exact KNN-LM verification cheap, and stay exact?

    python -m benchmarks.probe_bf16_first_pass            # needs the 1M-entry store of bench_knnlm

The exact index's batched search at 1M SmolLM2 entries costs about 79 + 8 (s - 1) ms for s queries on a
2-core Xeon (compute-bound fp32). This probe times a bf16 product over a bf16 copy of the keys (torch /
oneDNN, which uses AMX where the CPU has it) and counts, per query, the entries a rigorous error bound
keeps as candidates for an exact float64 re-ranking:

    |d~ - d| <= B = 2 ((2u + u^2) + d * 2^-24 + 1.01 u) |q| |x| (1 + 2u),   u = 2^-8

(bf16 rounding of q and x, fp32 accumulation over d dims, bf16 rounding of the product; Cauchy-Schwarz, so
only norms are needed). An entry can be among the k nearest only if d~ - B <= the k-th smallest d~ + B.
It checks that the exact k nearest are always among the candidates. Measured 2026-12-05 on the Xeon:
45-53 ms for s = 2..16 (68-69 ms at s = 1), 22-249 candidates of 1,000,000 at k = 16 over 24 queries,
the exact set always inside. Built since as ``ExactL2Index(first_pass="bf16")`` (rasd/ralmspec/exact.py,
chosen by ``"auto"`` where measured faster; its bound also covers the float32 distance arithmetic); this
script stays as the measurement that motivated it.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from rasd._assets import cache_dir
from rasd.ralmspec import KNNDatastore


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", default=str(cache_dir() / "ralm" / "knnlm-smollm2-135m-1000000"))
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--queries", type=int, default=16)
    args = parser.parse_args(argv)
    store = KNNDatastore.load(args.store)
    n, dim = store.keys.shape
    start = time.perf_counter()
    keys_bf16 = torch.empty(n, dim, dtype=torch.bfloat16)
    for s in range(0, n, 1 << 17):
        keys_bf16[s : s + (1 << 17)] = torch.from_numpy(np.array(store.keys[s : s + (1 << 17)]))
    print(f"bf16 copy of the keys: {time.perf_counter() - start:.1f} s, {keys_bf16.numel() * 2 / 1e9:.2f} GB")
    rng = np.random.default_rng(0)
    noise = 0.05 * rng.standard_normal((args.queries, dim)).astype(np.float32)
    queries = np.asarray(store.keys[rng.integers(0, n, args.queries)]) + noise
    q_bf16 = torch.from_numpy(queries).bfloat16()
    for s in sorted({1, 2, 4, 8, 12, args.queries}):
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            keys_bf16 @ q_bf16[:s].T
            times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        store.search(queries[:s], args.k)
        exact_s = time.perf_counter() - t0
        print(
            f"s = {s:2d}: bf16 product {min(times) * 1e3:6.1f} ms, exact index search {exact_s * 1e3:6.1f} ms"
        )
    u = 2.0**-8
    key_norms = np.zeros(n)
    for s in range(0, n, 1 << 17):
        key_norms[s : s + (1 << 17)] = (np.asarray(store.keys[s : s + (1 << 17)], dtype=np.float64) ** 2).sum(
            1
        )
    q_norms = (queries.astype(np.float64) ** 2).sum(1)
    dots = (keys_bf16 @ q_bf16.T).double().numpy()
    exact = store.search(queries, args.k)
    for i in range(args.queries):
        scale = np.sqrt(key_norms * q_norms[i]) * (1 + 2 * u)
        bound = 2 * ((2 * u + u * u) + dim * 2.0**-24 + 1.01 * u) * scale
        approx = key_norms + q_norms[i] - 2 * dots[:, i]
        kth_upper = np.partition(approx + bound, args.k - 1)[args.k - 1]
        candidates = np.flatnonzero(approx - bound <= kth_upper)
        inside = bool(np.isin(exact[i], candidates).all())
        print(f"query {i:2d}: {len(candidates):6d} candidates of {n}, exact {args.k} inside: {inside}")


if __name__ == "__main__":
    main()
