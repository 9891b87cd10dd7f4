"""Exact k-nearest-neighbour search by squared L2 that reads the keys once for a whole batch of queries.

Why: faiss's flat index scans the whole store once *per query* below ``nx * d < 128000`` (faiss >= 1.12; 20
queries in older releases), and above that it switches to a BLAS formulation whose float32 rounding can give
a query other neighbours than it gets alone. RaLMSpec's batched verification of s speculated steps then
costs s single searches and saves nothing once the store is larger than the caches. Here a batch of queries
costs about one pass over the keys, and every query gets exactly the neighbours it gets alone.

Definition (what "exact" means here): the distance of key ``y`` to query ``x`` is :func:`sq_dist64`, the
float64 sum of squared float64 differences of the float32 values; the k nearest are the k smallest distances,
ties broken by the smaller entry id. A query's answer depends on nothing else in its batch.

Method, per block of ``block_rows`` keys:

1. an approximate float32 distance for every (key, query) pair from one matrix product,
   ``|y|^2 - 2 x.y + |x|^2`` (the block is read once for all queries);
2. a pair is a *candidate* when its approximate distance is at most ``tau + 2E``, where ``tau`` is the k-th
   smallest approximate distance among the candidates so far and ``E`` bounds the float32 error of step 1
   for that query: ``|approx - exact| <= (d + 4) u (|x| + max|y|)^2`` (u = 2^-24; any summation order of d
   float32 products has error at most d u sum|x_i y_i|, then three roundings);
3. the candidates' distances are recomputed with :func:`sq_dist64`, sorted by (distance, id).

Why that is exact: the k entries with the smallest approximate distances stay candidates, so the k-th exact
distance among the candidates is at most ``tau_final + E``; an entry dropped in step 2 had an approximate
distance above ``tau + 2E >= tau_final + 2E``, so its exact distance is above ``tau_final + E``: strictly
farther than k candidates, whatever the tie rule.

The bf16 first pass (``first_pass="bf16"``, chosen by ``"auto"`` where it is measured faster): step 1's
products come from a bfloat16 copy of the keys and queries (torch/oneDNN, which uses AMX or AVX512-BF16
where the CPU has them: at 1M x 576 keys on a 2-core Xeon, 45-50 ms for 2..16 queries where the float32
kernel takes 79 + 8 (s - 1) ms), the products accumulated in float32 and rounded once to bfloat16, the
distance then formed in float32 by the native scan (``_core.bf16_distance_scan``). Only ``E`` changes
(u = 2^-8, the unit roundoff of bfloat16; M = max|y|):

    |x~.y~ - x.y| <= delta |x| |y|,  delta = (2u + u^2) + g_d (1 + u)^2 + u (1 + g_d)(1 + u)^2,
    E = 2 delta |x| M + 6 u32 (|x| + M)^2 + d 2^-120 (1 + |x|)(1 + M)

(rounding of both operands, float32 accumulation of d exact products in any order, g_d = d u32 / (1 - d u32),
the output rounding; the float32 sums and the norms' own rounding; denormals flushed to zero by the
hardware). The argument above is unchanged, so the answer is the same exact one, with 20-150 candidates per
query to re-rank at 1M entries and k = 16. Keys or queries longer than 1e18 take the float32 pass (no
bfloat16 overflow).
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch

from rasd import _core

# Unit roundoffs of float32 and bfloat16.
_U32 = 2.0**-24
_U16 = 2.0**-8
# Candidate lists are cut back to the k best (plus everything within the error margin) once they hold this
# many entries per query more than k: the cut is an argpartition, cheap next to a block's matrix product.
_PRUNE_SLACK = 4096
# Batches up to this many queries take the native small-GEMM kernel (one pass over a block for all of them).
_KERNEL_QUERIES = 64
FIRST_PASSES = ("auto", "fp32", "bf16")
# Keys per bf16 product: the [rows, queries] bf16 output the scan reads stays in L2 (2 MB at 32 queries).
_BF16_BLOCK = 32768
# "auto" keeps float32 below this many keys (little to gain; the bf16 copy costs memory) ...
_BF16_MIN_KEYS = 65536
# ... and takes bf16 only when its measured product (and scan) costs at most this share of float32's.
_BF16_MAX_SHARE = 0.7
# Longer keys or queries take the float32 pass: their bf16 products could overflow.
_BF16_MAX_LEN = 1e18


def sq_dist64(rows: np.ndarray, query: np.ndarray) -> np.ndarray:
    """Squared L2 distances [n] of ``rows`` [n, d] to ``query`` [d], in float64 from the float32 values.

    The one definition of distance shared by the exact search and KNN-LM's p_kNN (so that a neighbour's weight
    is computed from the same number that ranked it).
    """
    diff = rows.astype(np.float64) - query.astype(np.float64)[None, :]
    return np.einsum("ij,ij->i", diff, diff)


def nearest_exact(keys: np.ndarray, query: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` of the distinct entry ids ``ids`` nearest to ``query`` [d] by :func:`sq_dist64` over
    ``keys`` [N, d], ties to the smaller id; nearest first (the ranking that defines "exact" here)."""
    return ids[np.lexsort((ids, sq_dist64(np.asarray(keys[ids]), query)))[:k]]


def matvec(rows: np.ndarray, vec: np.ndarray) -> np.ndarray:
    """``rows @ vec`` [n] in float32 for rows [n, d], vec [d], computed by torch.

    Why not numpy: numpy's OpenBLAS runs a product of a few thousand rows on its own threads, which then
    spin for a while after returning and take a core from the LM forward that comes next (measured on a
    2-core EPYC: speculative KNN-LM's forwards went from 65 to 110 ms once its entry cache search was large
    enough to be threaded). torch's product runs on the same thread pool as the model.
    """
    return (_as_tensor(rows) @ _as_tensor(vec)).numpy()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A float32 tensor over ``array``'s memory (copied only when not contiguous float32)."""
    with warnings.catch_warnings():  # a read-only memory map: torch only reads it
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))


class ExactL2Index:
    """Exact squared-L2 k-nearest search over ``keys`` [N, d] float32 (see the module docstring).

    keys: used in place (a memory map works: a search streams it once); block_rows: keys per matrix product
    (default 64k for float32: 151 MB of 576-dim keys per product, few Python-level steps, and the block's
    [rows, queries] distance matrix stays small; 32k for bf16, whose [rows, queries] products the scan reads
    from L2). first_pass: "fp32", "bf16" (keeps a bfloat16 copy of the keys in memory, half their size) or
    "auto" (bf16 from 64k keys where a 50 ms measurement at construction finds it at least 30 % cheaper;
    the chosen pass is ``self.first_pass``). Either pass gives the same exact answer.
    """

    def __init__(self, keys: np.ndarray, *, block_rows: int | None = None, first_pass: str = "auto") -> None:
        if keys.ndim != 2 or keys.dtype != np.float32:
            raise TypeError(f"keys must be a float32 [N, d] array, got {keys.dtype} {keys.shape}")
        if block_rows is not None and block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        if first_pass not in FIRST_PASSES:
            raise ValueError(
                f"first_pass must be one of {', '.join(map(repr, FIRST_PASSES))}, got {first_pass!r}"
            )
        self.keys = keys
        self.dim = keys.shape[1]
        if first_pass == "auto":
            first_pass = self._measure_first_pass()
        self.first_pass = first_pass  # "fp32" or "bf16": the product step 1 uses
        self.block_rows = block_rows or (_BF16_BLOCK if first_pass == "bf16" else 65536)
        self.norms = np.empty(len(keys), dtype=np.float32)  # float32 |y|^2, as step 1 uses them
        # bf16 pass: the keys as bfloat16 [N, d], and |y|^2 rounded once from float64 (as the bound assumes)
        self._keys16 = torch.empty(keys.shape, dtype=torch.bfloat16) if first_pass == "bf16" else None
        max_norm = 0.0
        for start in range(0, len(keys), self.block_rows):
            block = np.asarray(keys[start : start + self.block_rows])
            sq64 = (block.astype(np.float64) ** 2).sum(1)
            block_max = float(np.sqrt(sq64).max()) if len(block) else 0.0
            if self._keys16 is not None and not block_max < _BF16_MAX_LEN:  # also catches inf and nan
                # bfloat16 products could overflow: float32 pass (the norms so far are as good for its bound)
                self.first_pass, self._keys16 = "fp32", None
            if self._keys16 is None:
                self.norms[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
            else:
                self.norms[start : start + len(block)] = sq64
                self._keys16[start : start + len(block)] = _as_tensor(block)
            max_norm = max(max_norm, block_max)
        self.max_norm = max_norm  # exact (float64) max |y|, for the error bound

    def __len__(self) -> int:
        return len(self.keys)

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids [q, k] int64 of the k nearest keys of each query [q, d], nearest first (-1 pads when N < k)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        x = np.ascontiguousarray(queries, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {x.shape}")
        q, n = len(x), len(self.keys)
        x_len = np.sqrt((x.astype(np.float64) ** 2).sum(1))
        # Only on the main thread: torch's OpenMP product called from another thread (an asynchronous
        # verification's worker) starts a second OpenMP team, and on a 2-core Xeon every later LM forward in
        # the process then ran at 60 instead of 37 ms (measured); the float32 pass runs on rasd's own pool.
        use16 = (
            self._keys16 is not None
            and threading.current_thread() is threading.main_thread()
            and bool((x_len < _BF16_MAX_LEN).all())
        )
        if use16:
            x_norms = (x_len**2).astype(np.float32)  # rounded once from float64, as the bound assumes
            x16 = _bf16_queries(x)
            margin = 2.0 * (1.0 + 1e-3) * self._error16(x_len)
        else:
            tx = torch.from_numpy(x) if q > _KERNEL_QUERIES else None  # see _dot
            x_norms = np.einsum("ij,ij->i", x, x)  # float32, as step 1 uses them
            # The error bound of step 1, doubled (the margin), rounded up to the float32 the comparison uses.
            margin = 2.0 * (self.dim + 4) * _U32 * (1.0 + 1e-6) * (x_len + self.max_norm) ** 2
        tau = np.full(q, np.inf)  # k-th smallest approximate distance among the candidates, per query
        cand_ids: list[list[np.ndarray]] = [[] for _ in range(q)]
        cand_dist: list[list[np.ndarray]] = [[] for _ in range(q)]
        held = np.zeros(q, dtype=np.int64)
        # A small first block sets every tau (all its rows are candidates), so later blocks pass few rows.
        first = min(n, max(4 * k, 1024))
        for start, stop in [(0, first)] + [
            (b, min(n, b + self.block_rows)) for b in range(first, n, self.block_rows)
        ]:
            limit = np.nextafter((tau + margin).astype(np.float32), np.float32(np.inf))
            if use16:
                dots = _bf16_products(self._keys16[start:stop], x16)
                rows, qs, vals = _core.bf16_distance_scan(dots, q, self.norms[start:stop], x_norms, limit)
                order = np.argsort(qs, kind="stable")  # query-major, rows ascending within a query
                rows, qs, vals = rows[order], qs[order], vals[order]
            else:
                approx = self._dot(x, tx, self.keys[start:stop]) * np.float32(-2.0)  # [q, rows]
                approx += self.norms[None, start:stop]
                approx += x_norms[:, None]
                qs, rows = np.nonzero(approx <= limit[:, None])  # query-major
                vals = approx[qs, rows]
            bounds = np.searchsorted(qs, np.arange(q + 1))
            for j in np.flatnonzero(np.diff(bounds)):
                sel = slice(bounds[j], bounds[j + 1])
                cand_ids[j].append(rows[sel] + start)
                cand_dist[j].append(vals[sel])
                held[j] += bounds[j + 1] - bounds[j]
                if held[j] >= k + _PRUNE_SLACK or (tau[j] == np.inf and held[j] >= k):
                    tau[j] = self._prune(cand_ids[j], cand_dist[j], k, margin[j])
                    held[j] = len(cand_ids[j][0])
        out = np.full((q, k), -1, dtype=np.int64)
        for j in range(q):
            if not cand_ids[j]:
                continue
            # Only those within the margin of the final tau go to the (float64, random-access) re-ranking:
            # up to k + _PRUNE_SLACK may be held, where a few dozen are left at the end.
            self._prune(cand_ids[j], cand_dist[j], k, margin[j])
            best = nearest_exact(self.keys, x[j], cand_ids[j][0], k)
            out[j, : len(best)] = best
        return out

    def _error16(self, x_len: np.ndarray) -> np.ndarray:
        """E [q] of the bf16 first pass for queries of float64 lengths ``x_len`` (module docstring)."""
        d, big = self.dim, self.max_norm
        g = d * _U32 / (1.0 - d * _U32)
        delta = (2 * _U16 + _U16**2) + g * (1 + _U16) ** 2 + _U16 * (1 + g) * (1 + _U16) ** 2
        return (
            2.0 * delta * x_len * big
            + 6.0 * _U32 * (x_len + big) ** 2
            + d * 2.0**-120 * (1.0 + x_len) * (1.0 + big)
        )

    def _measure_first_pass(self) -> str:
        """ "bf16" where its product and scan over a sample of keys, for 8 queries, cost at most
        :data:`_BF16_MAX_SHARE` of the float32 kernel's (best of 3 each; about 50 ms), else "fp32".

        The sample (128k keys) is larger than the CPU's caches, as the blocks of a real search are: a
        block already in cache would flatter the float32 kernel (2-core Xeon: 1.8 ms for 32k cached
        keys, 12 ms for 128k)."""
        n = len(self.keys)
        if n < _BF16_MIN_KEYS:
            return "fp32"
        block = np.ascontiguousarray(self.keys[: 4 * _BF16_BLOCK])
        if not np.isfinite(block).all():
            return "fp32"
        x = block[:: len(block) // 8][:8].copy()
        out = np.empty((len(x), len(block)), dtype=np.float32)
        keys16, x16 = _as_tensor(block).bfloat16(), _bf16_queries(x)
        ones, never = np.ones(len(block), np.float32), np.full(len(x), -np.inf, np.float32)

        def fp32() -> None:
            _core.small_gemm(x, block, None, out)

        def bf16() -> None:
            dots = _bf16_products(keys16, x16)
            _core.bf16_distance_scan(dots, len(x), ones, ones[: len(x)], never)  # nothing passes

        t32, t16 = _best_time(fp32), _best_time(bf16)
        return "bf16" if t16 <= _BF16_MAX_SHARE * t32 else "fp32"

    @staticmethod
    def _dot(x: np.ndarray, tx: torch.Tensor | None, block: np.ndarray) -> np.ndarray:
        """x @ block.T [q, rows] in float32 (tx: x as a tensor, only for batches the kernel leaves).

        Up to :data:`_KERNEL_QUERIES` queries: rasd's small-GEMM kernel, which streams the block once for
        all queries (2-core AVX2 EPYC, 1M x 576 keys: 8 queries in 88 ms, 16 in 152 ms, where torch's
        ``block @ x.T`` takes 254 and 388 ms and numpy's one-query product 92 ms; numpy's BLAS threads
        would also spin after returning, taking a core from the LM, see :func:`matvec`); more: torch's.
        Every rounding order is covered by the error bound."""
        if tx is None:
            out = np.empty((len(x), len(block)), dtype=np.float32)
            _core.small_gemm(x, np.ascontiguousarray(block), None, out)
            return out
        return (_as_tensor(block) @ tx.T).T.numpy()

    @staticmethod
    def _prune(ids: list[np.ndarray], dist: list[np.ndarray], k: int, margin: float) -> float:
        """Cut one query's candidates to those within ``margin`` of its k-th smallest approximate distance
        (in place, as one array each); returns that k-th distance (inf while fewer than k are held)."""
        all_ids, all_dist = np.concatenate(ids), np.concatenate(dist)
        if len(all_dist) < k:
            ids[:], dist[:] = [all_ids], [all_dist]
            return float("inf")
        kth = float(np.partition(all_dist, k - 1)[k - 1])
        keep = all_dist <= np.nextafter(np.float32(kth + margin), np.float32(np.inf))
        ids[:], dist[:] = [all_ids[keep]], [all_dist[keep]]
        return kth


def _bf16_queries(x: np.ndarray) -> torch.Tensor:
    """Queries [q, d] float32 as bfloat16 [16 m, d], zero rows padding q to a multiple of 16: the scan's
    vector width, and the product costs about the same for 2..16 columns (one query alone would take
    torch's slower matrix-vector path)."""
    out = torch.zeros((-(-len(x) // 16) * 16, x.shape[1]), dtype=torch.bfloat16)
    out[: len(x)] = torch.from_numpy(x)
    return out


def _bf16_products(keys16: torch.Tensor, x16: torch.Tensor) -> np.ndarray:
    """keys16 [rows, d] @ x16.T as bf16 bit patterns [rows, 16 m] int16, the scan's input."""
    return (keys16 @ x16.T).view(torch.int16).numpy()


def _best_time(fn: Callable[[], None], repeats: int = 3) -> float:
    """Shortest of ``repeats`` wall-clock timings of ``fn()`` (after one warm-up call), in seconds."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best
