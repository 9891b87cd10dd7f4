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
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from rasd import _core

# Unit roundoff of float32.
_U32 = 2.0**-24
# Candidate lists are cut back to the k best (plus everything within the error margin) once they hold this
# many entries per query more than k: the cut is an argpartition, cheap next to a block's matrix product.
_PRUNE_SLACK = 4096
# Batches up to this many queries take the native small-GEMM kernel (one pass over a block for all of them).
_KERNEL_QUERIES = 64


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
    (64k rows x 576 dims = 151 MB of keys per product: few Python-level steps, and the block's [rows, queries]
    distance matrix stays small).
    """

    def __init__(self, keys: np.ndarray, *, block_rows: int = 65536) -> None:
        if keys.ndim != 2 or keys.dtype != np.float32:
            raise TypeError(f"keys must be a float32 [N, d] array, got {keys.dtype} {keys.shape}")
        if block_rows < 1:
            raise ValueError(f"block_rows must be >= 1, got {block_rows}")
        self.keys = keys
        self.block_rows = block_rows
        self.norms = np.empty(len(keys), dtype=np.float32)  # float32 |y|^2, as step 1 uses them
        max_norm = 0.0
        for start in range(0, len(keys), block_rows):
            block = np.asarray(keys[start : start + block_rows])
            self.norms[start : start + len(block)] = np.einsum("ij,ij->i", block, block)
            max_norm = max(max_norm, float(np.sqrt((block.astype(np.float64) ** 2).sum(1)).max()))
        self.max_norm = max_norm  # exact (float64) max |y|, for the error bound
        self.dim = keys.shape[1]

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
        tx = torch.from_numpy(x) if q > _KERNEL_QUERIES else None  # see _dot
        x_norms = np.einsum("ij,ij->i", x, x)  # float32, as step 1 uses them
        x_len = np.sqrt((x.astype(np.float64) ** 2).sum(1))
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
            block = self.keys[start:stop]
            approx = self._dot(x, tx, block) * np.float32(-2.0)  # [q, rows]
            approx += self.norms[None, start:stop]
            approx += x_norms[:, None]
            limit = np.nextafter((tau + margin).astype(np.float32), np.float32(np.inf))
            qs, rows = np.nonzero(approx <= limit[:, None])  # query-major
            bounds = np.searchsorted(qs, np.arange(q + 1))
            for j in np.flatnonzero(np.diff(bounds)):
                sel = rows[bounds[j] : bounds[j + 1]]
                cand_ids[j].append(sel + start)
                cand_dist[j].append(approx[j, sel])
                held[j] += len(sel)
                if held[j] >= k + _PRUNE_SLACK or (tau[j] == np.inf and held[j] >= k):
                    tau[j] = self._prune(cand_ids[j], cand_dist[j], k, margin[j])
                    held[j] = len(cand_ids[j][0])
        out = np.full((q, k), -1, dtype=np.int64)
        for j in range(q):
            if not cand_ids[j]:
                continue
            best = nearest_exact(self.keys, x[j], np.concatenate(cand_ids[j]), k)
            out[j, : len(best)] = best
        return out

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
