"""The native core under threads: queries while the store grows, and kernel thread-pool swaps mid-call.

Run under AddressSanitizer/UBSan by scripts/sanitize.sh, where a use-after-free or a data race on the
store's vectors would be reported, not only a wrong answer.
"""

from __future__ import annotations

import threading

import numpy as np

from rasd import Datastore, _core


def _reference_match(tokens: list[int], docs: list[list[int]]) -> int:
    """Longest suffix of ``tokens`` occurring inside one document (brute force)."""
    best = 0
    for k in range(1, len(tokens) + 1):
        suffix = tokens[-k:]
        if any(doc[i : i + k] == suffix for doc in docs for i in range(len(doc) - k + 1)):
            best = k
        else:
            break
    return best


def test_four_readers_and_one_writer_agree_with_a_serial_build():
    rng = np.random.default_rng(0)
    store = Datastore(vocab_size=30)
    store.add(rng.integers(0, 30, 50))
    chunks = [rng.integers(0, 30, int(rng.integers(1, 40))).tolist() for _ in range(300)]
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        last = 0
        try:
            while not stop.is_set():
                n = len(store)
                assert n >= last  # sizes only grow, read under the store's lock
                last = n
                m = store.matcher()
                m.feed(r.integers(0, 30, 20))
                tree = m.retrieve(16, 6)
                assert len(tree) <= 16 and (tree.tokens < 30).all()
                assert store.num_documents >= 1
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    readers = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
    for t in readers:
        t.start()
    for chunk in chunks:
        store.extend(chunk)
    stop.set()
    for t in readers:
        t.join()
    assert not errors, errors
    # The concurrent store equals one built serially from the same tokens.
    rng = np.random.default_rng(0)
    serial = Datastore(vocab_size=30)
    first = rng.integers(0, 30, 50)
    serial.add(first)
    for chunk in chunks:
        serial.extend(chunk)
    assert len(serial) == len(store) and serial.info()["states"] == store.info()["states"]
    docs = [first.tolist() + [t for c in chunks for t in c]]
    for ctx in (rng.integers(0, 30, 15).tolist() for _ in range(20)):
        assert store.match(ctx) == serial.match(ctx) == _reference_match(ctx, docs)


def test_set_num_threads_while_kernels_run_on_other_threads():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((5, 300), dtype=np.float32)
    w = rng.standard_normal((700, 300), dtype=np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    errors: list[BaseException] = []
    stop = threading.Event()

    def worker() -> None:
        out = np.empty((5, 700), dtype=np.float32)
        try:
            while not stop.is_set():
                _core.small_gemm(x, w, None, out)
                np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-3)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        for i in range(300):  # every call may replace the pool another thread is running on
            _core.set_num_threads(1 + i % 4)
    finally:
        stop.set()
        for t in threads:
            t.join()
        _core.set_num_threads(0)
    assert not errors, errors
