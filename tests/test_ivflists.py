"""The IVF index state kept beside a KNN-LM datastore: a reopened store gets the same index without training,
and a damaged, foreign or crafted state file is rebuilt with a warning, never trusted or crashed on."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest

pytest.importorskip("faiss")

from rasd.ralmspec import ivflists
from rasd.ralmspec.knnlm import KNNDatastore

N, D, LISTS = 6000, 24, 40


@pytest.fixture()
def saved(tmp_path):
    rng = np.random.default_rng(7)
    # Clustered keys, so lists differ in size and a wrong list assignment changes answers.
    centers = rng.standard_normal((30, D)).astype(np.float32) * 4
    keys = (centers[rng.integers(0, 30, N)] + rng.standard_normal((N, D))).astype(np.float32)
    values = rng.integers(0, 500, N)
    KNNDatastore(keys, values, model_tag={"name": "t"}).save(tmp_path)
    queries = (keys[rng.integers(0, N, 64)] + 0.3 * rng.standard_normal((64, D))).astype(np.float32)
    return tmp_path, queries


def _open(path, **kw):
    return KNNDatastore.load(path, index_kind="ivf", ivf_lists=LISTS, ivf_probe=4, **kw)


def _fresh(path):
    """The reference: the same store's IVF index built with no state file at all."""
    return _open(path, index_dir=None)


def test_reopening_reuses_the_state_and_gives_the_same_index(saved, monkeypatch):
    path, queries = saved
    ref = _fresh(path).search(queries, 8)
    assert not ivflists.cache_file(path, LISTS).exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a first build and a clean reopen warn about nothing
        first = _open(path)
        assert ivflists.cache_file(path, LISTS).exists()
        np.testing.assert_array_equal(first.search(queries, 8), ref)

        def no_training(*_a, **_k):
            raise AssertionError("the state file was not used: k-means ran again")

        monkeypatch.setattr(ivflists, "_train", no_training)
        again = _open(path)
    np.testing.assert_array_equal(again.search(queries, 8), ref)
    assert again.index.ntotal == N


def _rewrite(path, **arrays):
    """Write a state file with ``arrays`` replacing the saved ones (the digest is recomputed unless given:
    a crafted file that passes the checksum)."""
    file = ivflists.cache_file(path, LISTS)
    with np.load(file) as f:
        state = {k: f[k] for k in f.files}
    state.update(arrays)
    if "digest" not in arrays:
        fp = state["fingerprint"].tobytes()
        digest = hashlib.sha256(fp + state["centroids"].tobytes() + state["assign"].tobytes()).digest()
        state["digest"] = np.frombuffer(digest, dtype=np.uint8)
    with open(file, "wb") as f:
        np.savez(f, **state)


def _flip_byte(file, at):
    data = bytearray(file.read_bytes())
    data[at] ^= 0x5A
    file.write_bytes(bytes(data))


BAD_STATES = {
    "truncated": lambda p, f: f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2]),
    "flipped byte in the arrays": lambda p, f: _flip_byte(f, len(f.read_bytes()) // 2),
    "not a zip": lambda p, f: f.write_bytes(b"\x93NUMPY garbage" * 100),
    "empty": lambda p, f: f.write_bytes(b""),
    "assign out of range (checksum forged)": lambda p, f: _rewrite(
        p, assign=np.full(N, LISTS + 1000, dtype=np.int32)
    ),
    "negative list (checksum forged)": lambda p, f: _rewrite(p, assign=np.full(N, -1, dtype=np.int32)),
    "assign wrong length": lambda p, f: _rewrite(p, assign=np.zeros(N - 1, dtype=np.int32)),
    "assign wrong dtype": lambda p, f: _rewrite(p, assign=np.zeros(N, dtype=np.int64)),
    "centroids wrong shape": lambda p, f: _rewrite(p, centroids=np.zeros((LISTS, D + 1), np.float32)),
    "NaN centroids (checksum forged)": lambda p, f: _rewrite(
        p, centroids=np.full((LISTS, D), np.nan, np.float32)
    ),
    "other entries' fingerprint": lambda p, f: _rewrite(p, fingerprint=np.zeros(32, dtype=np.uint8)),
    "edited assign, old checksum": lambda p, f: _rewrite(
        p, assign=np.zeros(N, dtype=np.int32), digest=np.load(f)["digest"]
    ),
    "missing array": lambda p, f: f.write_bytes(_only_centroids(f)),
    "pickled object": lambda p, f: _pickled(f),
}


def _only_centroids(file):
    import io

    buf = io.BytesIO()
    with np.load(file) as z:
        np.savez(buf, centroids=z["centroids"])
    return buf.getvalue()


def _pickled(file):
    with open(file, "wb") as f:
        np.savez(f, fingerprint=np.array([object()], dtype=object), centroids=np.zeros(1), assign=np.zeros(1))


@pytest.mark.parametrize("damage", list(BAD_STATES))
def test_a_bad_state_file_is_rebuilt_with_a_warning(saved, damage):
    path, queries = saved
    ref = _fresh(path).search(queries, 8)
    _open(path)  # writes the state file
    file = ivflists.cache_file(path, LISTS)
    BAD_STATES[damage](path, file)
    with pytest.warns(RuntimeWarning, match="rebuilding the IVF index"):
        store = _open(path)
    np.testing.assert_array_equal(store.search(queries, 8), ref)
    # ... and the rewritten file is good again: the next open is silent and the same.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(_open(path).search(queries, 8), ref)


def test_a_changed_store_does_not_take_the_old_state(saved):
    """The store rebuilt in place (other values, same size): the old state is refused, not reused."""
    path, _ = saved
    _open(path)
    store = KNNDatastore.load(path)
    keys = np.array(store.keys)  # a copy: keys.npy is rewritten below, under the memory map
    KNNDatastore(keys, (store.values + 1) % 500, model_tag=store.model_tag).save(path)
    with pytest.warns(RuntimeWarning, match="built for other entries"):
        _open(path)


def test_an_unwritable_directory_only_warns(saved, monkeypatch):
    path, queries = saved
    ref = _fresh(path).search(queries, 8)

    def refuse(*_a, **_k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(ivflists.os, "replace", refuse)
    with pytest.warns(RuntimeWarning, match="could not keep the IVF index state"):
        store = _open(path)
    np.testing.assert_array_equal(store.search(queries, 8), ref)
    assert not ivflists.cache_file(path, LISTS).exists()
    assert not list(path.glob(".ivf-*"))  # no temporary file left behind
