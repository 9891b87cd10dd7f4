"""A faiss IVF-Flat index over a datastore's keys whose trained state is kept beside the datastore.

Building an IVF index costs k-means on a sample and then the assignment of every entry to its nearest list:
9-11 s for 1M 576-dim SmolLM2 entries on 2 cores, paid again by every process that opens the store (the
speculative KNN-LM's guide is one). The state that costs that time is small: the centroids ``[lists, d]``
and each entry's list ``[N]`` (6 MB at 1M entries). :func:`build_ivf` keeps them in ``ivf-<lists>.npz`` in
the datastore's directory and refills the lists from the memory-mapped keys on the next open, giving the same
index as a fresh build.

The file is only trusted after checks: numpy's loader without pickles, the fingerprint of the entries it was
built for (size, dimension, lists, the values and a sample of key rows), shapes, dtypes, finite centroids,
list numbers in range, and a SHA-256 digest of the arrays. A file that fails any of them (truncated, flipped
bytes, another store's, crafted) is reported with a warning and rebuilt; nothing from it reaches faiss.
"""

from __future__ import annotations

import hashlib
import os
import threading
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from rasd.ralmspec.retrievers import _faiss

FORMAT = 1
CHUNK_ROWS = 1 << 17  # entries per piece when reading a memory map (never copied whole)
_SAMPLE_ROWS = 64


def cache_file(directory: str | os.PathLike, lists: int) -> Path:
    """Where the trained state of a ``lists``-list IVF index over the store in ``directory`` is kept."""
    return Path(directory) / f"ivf-{lists}.npz"


def sample_rows(n: int) -> np.ndarray:
    """The first, the last and 62 seeded random rows of an n-entry store (sorted, unique): the sample that
    stands for the whole key matrix where reading it all would cost too much."""
    return np.unique(np.r_[0, n - 1, np.random.default_rng(0).integers(0, n, _SAMPLE_ROWS - 2)])


def fingerprint(keys: np.ndarray, values: np.ndarray, lists: int) -> bytes:
    """SHA-256 of what an IVF state depends on: N, d, the list count, every value and 64 sampled key rows
    (hashing every key would read the whole store)."""
    n, d = keys.shape
    rows = sample_rows(n)
    h = hashlib.sha256(f"rasd-ivf {FORMAT} {n} {d} {lists}".encode())
    h.update(np.ascontiguousarray(values, dtype=np.int64).tobytes())
    h.update(np.ascontiguousarray(keys[rows], dtype=np.float32).tobytes())
    return h.digest()


def _digest(centroids: np.ndarray, assign: np.ndarray, fp: bytes) -> bytes:
    return hashlib.sha256(fp + centroids.tobytes() + assign.tobytes()).digest()


def _train(keys: np.ndarray, lists: int) -> tuple[np.ndarray, np.ndarray]:
    """Centroids [lists, d] (k-means on 64 sampled entries per list) and each entry's list [N] int32."""
    faiss = _faiss()
    n, d = keys.shape
    sample = np.random.default_rng(0).choice(n, min(n, 64 * lists), False)
    quantizer = faiss.IndexFlatL2(d)
    index = faiss.IndexIVFFlat(quantizer, d, lists)
    index.train(np.asarray(keys[np.sort(sample)]))
    centroids = quantizer.reconstruct_n(0, lists).astype(np.float32)
    assign = np.empty(n, dtype=np.int32)
    for start in range(0, n, CHUNK_ROWS):
        _, nearest = quantizer.search(np.ascontiguousarray(keys[start : start + CHUNK_ROWS]), 1)
        assign[start : start + CHUNK_ROWS] = nearest[:, 0]
    return centroids, assign


def _read(path: Path, fp: bytes, n: int, d: int, lists: int) -> tuple[np.ndarray, np.ndarray] | None:
    """The checked state in ``path``, or None (with a warning saying why, unless there is no file)."""
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: np.asarray(f[k]) for k in ("fingerprint", "centroids", "assign", "digest")}
    except Exception as exc:  # zip, CRC, header and key errors all mean the same: not a usable file
        return _stale(path, f"unreadable ({type(exc).__name__}: {exc})")
    got_fp, centroids, assign, digest = (arrays[k] for k in ("fingerprint", "centroids", "assign", "digest"))
    if got_fp.dtype != np.uint8 or got_fp.tobytes() != fp:
        return _stale(path, "built for other entries (the store changed) or another list count")
    if centroids.dtype != np.float32 or centroids.shape != (lists, d) or assign.dtype != np.int32:
        return _stale(path, f"centroids {centroids.dtype} {centroids.shape}, lists {assign.dtype}")
    if assign.shape != (n,):
        return _stale(path, f"{assign.shape} list numbers for {n} entries")
    if digest.dtype != np.uint8 or digest.tobytes() != _digest(centroids, assign, fp):
        return _stale(path, "checksum mismatch (damaged or edited)")
    if not np.isfinite(centroids).all():
        return _stale(path, "non-finite centroids")
    if n and (int(assign.min()) < 0 or int(assign.max()) >= lists):
        return _stale(path, f"list numbers outside [0, {lists})")
    return centroids, assign


def _stale(path: Path, why: str) -> None:
    warnings.warn(f"{path}: {why}; rebuilding the IVF index and rewriting it", RuntimeWarning, stacklevel=4)
    return None


def _write(path: Path, fp: bytes, centroids: np.ndarray, assign: np.ndarray) -> None:
    """Write atomically (temporary file renamed into place); a directory we cannot write only warns."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                fingerprint=np.frombuffer(fp, dtype=np.uint8),
                centroids=centroids,
                assign=assign,
                digest=np.frombuffer(_digest(centroids, assign, fp), dtype=np.uint8),
            )
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        warnings.warn(
            f"could not keep the IVF index state in {path} ({exc}); it is rebuilt on every open",
            RuntimeWarning,
            stacklevel=3,
        )


def build_ivf(
    keys: np.ndarray, values: np.ndarray, lists: int, probe: int, directory: str | os.PathLike | None = None
) -> Any:
    """A faiss ``IndexIVFFlat`` (L2) over ``keys`` [N, d] float32 with ``lists`` lists, ``probe`` searched.

    With ``directory`` (the datastore's own), the trained state is read from ``ivf-<lists>.npz`` there when it
    passes its checks (module docstring) and written there after a fresh build; the index is the same either
    way. values: [N] the entries' values (part of the fingerprint)."""
    faiss = _faiss()
    n, d = keys.shape
    path = None if directory is None else cache_file(directory, lists)
    fp = fingerprint(keys, values, lists) if path is not None else b""
    state = _read(path, fp, n, d, lists) if path is not None else None
    if state is None:
        state = _train(keys, lists)
        if path is not None:
            _write(path, fp, *state)
    centroids, assign = state
    quantizer = faiss.IndexFlatL2(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, lists)
    index.is_trained = True
    for start in range(0, n, CHUNK_ROWS):
        part = np.ascontiguousarray(keys[start : start + CHUNK_ROWS], dtype=np.float32)
        lists_of = np.ascontiguousarray(assign[start : start + CHUNK_ROWS], dtype=np.int64)
        index.add_core(len(part), faiss.swig_ptr(part), None, faiss.swig_ptr(lists_of))
    index.nprobe = probe
    return index  # faiss's constructor wrapper keeps a reference to the quantizer
