"""The suffix-automaton datastore against brute-force references, persistence, and hostile files."""

from __future__ import annotations

import os
import threading
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rasd import data
from rasd.datastore import Datastore, build_datastore, tokenizer_fingerprint
from rasd.tree import Source

VOCAB = 6  # a small alphabet makes repeats (and interesting automata) common

docs_strategy = st.lists(st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=40), min_size=1, max_size=4)
context_strategy = st.lists(st.integers(0, VOCAB - 1), min_size=0, max_size=12)


def occurs(needle, haystack) -> list[int]:
    """End positions of ``needle`` in ``haystack``."""
    k = len(needle)
    return [i + k - 1 for i in range(len(haystack) - k + 1) if haystack[i : i + k] == needle]


def ref_match(docs, context) -> int:
    for k in range(len(context), 0, -1):
        if any(occurs(context[-k:], d) for d in docs):
            return k
    return 0


def ref_trie(docs, suffix, max_depth) -> Counter:
    """Counts of every continuation path (tuple of tokens) after the occurrences of ``suffix``."""
    counts: Counter = Counter()
    for d in docs:
        for end in occurs(suffix, d):
            for depth in range(1, max_depth + 1):
                if end + depth >= len(d):
                    break
                counts[tuple(d[end + 1 : end + 1 + depth])] += 1
    return counts


def tree_paths(tree) -> dict[tuple, int]:
    paths: dict[int, tuple] = {}
    out = {}
    for i, (tok, par) in enumerate(zip(tree.tokens.tolist(), tree.parents.tolist(), strict=True)):
        paths[i] = (paths[par] if par >= 0 else ()) + (tok,)
        out[paths[i]] = i
    return out


def build(docs) -> Datastore:
    store = Datastore(vocab_size=VOCAB)
    for d in docs:
        store.add(d)
    return store


@given(docs_strategy, context_strategy)
@settings(max_examples=150, deadline=None)
def test_match_length_matches_brute_force(docs, context):
    assert build(docs).match(context) == ref_match(docs, context)


@given(docs_strategy, context_strategy, st.integers(1, 5), st.integers(1, 30))
@settings(max_examples=150, deadline=None)
def test_retrieval_tree_counts_match_brute_force(docs, context, max_depth, max_nodes):
    store = build(docs)
    tree = store.retrieve(context, max_nodes=max_nodes, max_depth=max_depth, score="count")
    length = ref_match(docs, context)
    if length == 0:
        assert len(tree) == 0
        return
    ref = ref_trie(docs, context[-length:], max_depth)
    got = tree_paths(tree)
    # Every returned path is a real continuation with its exact count.
    for path, node in got.items():
        assert ref[path] == tree.scores[node]
    # Best-first: the returned counts are the top max_nodes counts of the whole trie.
    assert sorted(tree.scores.tolist(), reverse=True) == sorted(ref.values(), reverse=True)[:max_nodes]
    # Nodes are topological and siblings ordered by decreasing count.
    for kids in tree.children():
        counts = [tree.scores[k] for k in kids]
        assert counts == sorted(counts, reverse=True)
    assert (tree.sources == Source.CORPUS).all()


@given(docs_strategy, context_strategy)
@settings(max_examples=80, deadline=None)
def test_ratio_scores_are_smoothed_conditional_frequencies(docs, context):
    store = build(docs)
    tree = store.retrieve(context, max_nodes=50, max_depth=3)
    length = ref_match(docs, context)
    if not length:
        return
    ref = ref_trie(docs, context[-length:], 3)
    for path, node in tree_paths(tree).items():
        siblings = sum(c for p, c in ref.items() if len(p) == len(path) and p[:-1] == path[:-1])
        assert tree.scores[node] == pytest.approx(ref[path] / (siblings + 1), rel=1e-6)


@given(docs_strategy, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40), st.integers(1, 5))
@settings(max_examples=150, deadline=None)
def test_dynamic_tail_match_under_online_extension(docs, text, chunk):
    """The prompt-lookup tail: the longest suffix of the text that occurs earlier, checked after every chunk
    of online extension (states get cloned underneath the matcher)."""
    store = build(docs)
    for start in range(0, len(text), chunk):
        if start == 0:
            store.add(text[:chunk])  # a new document; extend() appends to the current one
        else:
            store.extend(text[start : start + chunk])
        current = text[: start + chunk]
        expected = ref_match([*docs, current[:-1]], current)
        assert store.tail_match() == expected
        tree = store.retrieve_tail(max_nodes=40, max_depth=3, score="count")
        if expected:
            # The last occurrence (the tail itself) has no continuation, so the full text can be used.
            ref = ref_trie([*docs, current], current[-expected:], 3)
            got = {p: float(tree.scores[i]) for p, i in tree_paths(tree).items()}
            assert all(ref[p] == c for p, c in got.items())
            assert len(tree) == min(40, len(ref))


@given(docs_strategy, st.lists(context_strategy, min_size=1, max_size=5))
@settings(max_examples=60, deadline=None)
def test_online_extension_equals_batch_build_and_matchers_survive_growth(docs, contexts):
    batch = build(docs)
    online = Datastore(vocab_size=VOCAB)
    matcher = online.matcher()
    fed: list[int] = []
    for d in docs:
        online.add(d[:1])
        for t in d[1:]:
            online.extend([t])
    for ctx in contexts:
        matcher.feed(ctx)
        fed += ctx
        assert matcher.length == ref_match(docs, fed)
        a = batch.retrieve(fed, max_nodes=20, max_depth=4)
        b = matcher.retrieve(max_nodes=20, max_depth=4)
        assert a.tokens.tolist() == b.tokens.tolist() and a.parents.tolist() == b.parents.tolist()


@given(docs_strategy, st.lists(context_strategy, min_size=1, max_size=5))
@settings(max_examples=40, deadline=None)
def test_save_load_round_trip(tmp_path_factory, docs, contexts):
    path = tmp_path_factory.mktemp("ds") / "store.rasd"
    store = build(docs)
    store.save(path)
    loaded = Datastore.load(path)
    assert len(loaded) == len(store) and loaded.num_documents == len(docs)
    assert loaded.read_only
    for ctx in contexts:
        assert loaded.match(ctx) == store.match(ctx)
        a, b = loaded.retrieve(ctx, 30, 5), store.retrieve(ctx, 30, 5)
        assert a.tokens.tolist() == b.tokens.tolist() and np.allclose(a.scores, b.scores)


def test_backoff_merges_shorter_suffixes_when_the_match_is_rare():
    store = Datastore()
    store.add([9, 1, 2, 3] + [5, 1, 2, 4] * 5)
    exact = store.retrieve([9, 1, 2], max_nodes=5, max_depth=1, score="count")
    assert exact.tokens.tolist() == [3] and exact.scores.tolist() == [1]
    backed = store.retrieve([9, 1, 2], max_nodes=5, max_depth=1, score="count", backoff_min_count=3)
    assert backed.tokens.tolist() == [4, 3] and backed.scores.tolist() == [5, 1]


def test_bad_ids_and_read_only_are_clear_errors(tmp_path):
    store = Datastore(vocab_size=10)
    with pytest.raises(ValueError, match="negative"):
        store.add([1, -2])
    with pytest.raises(ValueError, match="outside this datastore's vocabulary"):
        store.retrieve([3, 12])
    with pytest.raises(TypeError, match="integer"):
        store.add([1.5, 2.0])
    store.add([1, 2, 3])
    store.save(tmp_path / "s.rasd")
    loaded = Datastore.load(tmp_path / "s.rasd")
    with pytest.raises(ValueError, match="read-only"):
        loaded.add([1])
    with pytest.raises(ValueError, match="outside"):
        loaded.match([10])


def _hostile_files(tmp_path, rng):
    store = Datastore(vocab_size=50)
    for _ in range(5):
        store.add(rng.integers(0, 50, 200))
    good = tmp_path / "good.rasd"
    store.save(good)
    blob = good.read_bytes()
    cases = {"empty": b"", "foreign": b"PK\x03\x04" + bytes(600), "truncated_header": blob[:100]}
    for cut in rng.integers(1, len(blob), 10):
        cases[f"truncated_{cut}"] = blob[:cut]
    for k in range(30):
        corrupt = bytearray(blob)
        for pos in rng.integers(0, len(blob), int(rng.integers(1, 8))):
            corrupt[pos] ^= int(rng.integers(1, 256))
        cases[f"flipped_{k}"] = bytes(corrupt)
    return cases


@pytest.mark.parametrize("verify", [True, False])
def test_load_never_crashes_on_corrupt_truncated_or_foreign_files(tmp_path, verify):
    rng = np.random.default_rng(0)
    loaded_ok = 0
    for name, blob in _hostile_files(tmp_path, rng).items():
        path = tmp_path / f"{name}.rasd"
        path.write_bytes(blob)
        try:
            store = Datastore.load(path, verify=verify)
        except ValueError as exc:
            assert "datastore" in str(exc)
            continue
        # Loaded despite damage (only possible without checksums): queries must stay in bounds.
        assert not verify or blob == (tmp_path / "good.rasd").read_bytes()
        loaded_ok += 1
        for _ in range(20):
            try:
                store.retrieve(rng.integers(0, 50, 6), max_nodes=32, max_depth=6)
            except ValueError as exc:
                assert "corrupt datastore" in str(exc)
    if verify:
        assert loaded_ok == 0


def test_concurrent_queries_from_threads_agree_with_serial(tmp_path):
    rng = np.random.default_rng(1)
    store = Datastore()
    for _ in range(50):
        store.add(rng.integers(0, 30, 300))
    contexts = [rng.integers(0, 30, 8) for _ in range(200)]
    serial = [store.retrieve(c, 16, 6).tokens.tolist() for c in contexts]
    results: dict[int, list] = {}

    def work(k):
        results[k] = [store.retrieve(c, 16, 6).tokens.tolist() for c in contexts]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for _ in range(50):  # a writer growing the store meanwhile (new documents do not change old matches)
        store.add(rng.integers(30, 40, 50))
    for t in threads:
        t.join()
    assert all(r == serial for r in results.values())


@pytest.mark.real_model
def test_real_code_corpus_and_tokenizer_identity(tmp_path, smollm2, qwen_draft):
    _, smol_tok = smollm2
    _, qwen_tok = qwen_draft
    files = list(data.stdlib_code(max_files=40))
    store = Datastore(vocab_size=len(smol_tok))
    for f in files:
        store.add(smol_tok(f.text).input_ids)
    path = tmp_path / "stdlib.rasd"
    store.save(path, tokenizer=smol_tok)
    loaded = Datastore.load(path, tokenizer=smol_tok)
    assert loaded.info()["tokenizer_hash"] == tokenizer_fingerprint(smol_tok).vocab_hash
    with pytest.raises(ValueError, match="was built with tokenizer"):
        Datastore.load(path, tokenizer=qwen_tok)
    # Real code repeats itself: a typical line prefix has continuations in the corpus.
    context = smol_tok("    def __init__(self").input_ids
    tree = loaded.retrieve(context, max_nodes=16, max_depth=4)
    assert loaded.match(context) >= 3 and len(tree) > 0
    assert os.path.getsize(path) == loaded.info()["file_bytes"]


_SAVER = r"""
import sys, numpy as np
from rasd import Datastore
seed, path, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
rng = np.random.default_rng(seed)
store = Datastore(vocab_size=100)
for _ in range(20):
    store.add(rng.integers(0, 100, 3000))
for _ in range(rounds):
    store.save(path)
"""


def test_concurrent_saves_to_one_path_leave_one_valid_file(tmp_path):
    """Two processes saving different stores to one path over and over: every save succeeds, the file is
    always one of the two complete stores (its checksums pass), and no temporary file is left behind."""
    import subprocess
    import sys

    path = tmp_path / "shared.rasd"
    procs = [
        subprocess.Popen([sys.executable, "-c", _SAVER, str(seed), str(path), "25"], stderr=subprocess.PIPE)
        for seed in (1, 2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-500:]
    store = Datastore.load(path, verify=True)
    store.check_integrity(progress=False)
    assert len(store) == 60000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shared.rasd"]


def test_save_never_writes_through_a_symlink(tmp_path):
    """A symlink planted where an old rasd put its temporary file is left alone: the save writes its own
    new file and the symlink's target is untouched."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "s.rasd.tmp").symlink_to(victim)
    store = Datastore(vocab_size=10)
    store.add([1, 2, 3])
    store.save(tmp_path / "s.rasd")
    assert victim.read_text() == "precious"
    assert len(Datastore.load(tmp_path / "s.rasd")) == 3


def test_special_paths_are_refused_without_blocking(tmp_path):
    import os

    fifo = tmp_path / "fifo.rasd"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="not a regular file"):
        Datastore.load(fifo)  # would block forever in open() without O_NONBLOCK
    store = Datastore(vocab_size=10)
    store.add([1, 2])
    store.save(tmp_path / "a.rasd")
    with pytest.raises(ValueError, match="NUL"):
        Datastore.load(str(tmp_path / "a.rasd") + "\0.evil")
    with pytest.raises(ValueError, match="NUL"):
        store_mut = Datastore(vocab_size=10)
        store_mut.add([1])
        store_mut.save(str(tmp_path / "b.rasd") + "\0x")


def test_a_store_saved_without_a_tokenizer_records_an_unknown_vocabulary(tmp_path):
    """Not max_token + 1: that guess refused the tokenizer's other ids part-way through generation."""
    store = Datastore()
    store.add([5, 6, 7, 5, 6])
    store.save(tmp_path / "a.rasd")
    loaded = Datastore.load(tmp_path / "a.rasd")
    assert loaded.vocab_size is None and "unknown" in str(loaded.info()["vocab_size"])
    assert loaded.match([100, 5, 6]) == 2  # ids beyond the ones stored are fine


def test_file_text_fields_never_raise_bare_decode_errors(tmp_path):
    """A name that is not UTF-8 (a damaged or foreign file, CRCs recomputed) reads with replacement
    characters; a long non-ASCII tokenizer name is cut on a character boundary when saved."""
    from rasd.datastore import TokenizerIdentity
    from tests.test_datastore_fuzz import DatastoreFile

    store = Datastore(vocab_size=10)
    store.add([1, 2, 3])
    long_name = "токенизатор" * 7  # 77 Cyrillic characters, 154 bytes of UTF-8
    store.save(tmp_path / "a.rasd", identity=TokenizerIdentity(long_name, "ab" * 32, 10))
    loaded = Datastore.load(tmp_path / "a.rasd")
    assert (
        long_name.startswith(loaded.info()["tokenizer"]) and len(loaded.info()["tokenizer"].encode()) <= 127
    )
    f = DatastoreFile.read(tmp_path / "a.rasd")
    f.header[128:132] = b"\xff\xfe\xc3\x28"
    f.write(tmp_path / "b.rasd")
    assert "\ufffd" in Datastore.load(tmp_path / "b.rasd").info()["tokenizer"]


@pytest.mark.real_model
def test_tokenizer_identity_covers_merges_and_datastore_objects(smollm2):
    """Same vocabulary but fewer merges: other ids for the same text, so refused; a Datastore object handed
    to CorpusLookup is checked against the tokenizer too."""
    import copy
    import json

    from rasd.drafting import CorpusLookup

    _, tok = smollm2
    store = Datastore(vocab_size=len(tok))
    store.add(tok("def f(x):\n    return x")["input_ids"])
    identity = tokenizer_fingerprint(tok)
    store._identity = identity
    store.check_tokenizer(tok)
    pruned = copy.deepcopy(tok)
    spec = json.loads(pruned.backend_tokenizer.to_str())
    spec["model"]["merges"] = spec["model"]["merges"][: len(spec["model"]["merges"]) // 4]
    from tokenizers import Tokenizer

    pruned._tokenizer = Tokenizer.from_str(json.dumps(spec))
    assert tokenizer_fingerprint(pruned).vocab_hash == identity.vocab_hash
    with pytest.raises(ValueError, match="different merges"):
        store.check_tokenizer(pruned)
    with pytest.raises(ValueError, match="different merges"):
        CorpusLookup(store, tokenizer=pruned)


@pytest.mark.real_model
def test_build_datastore_takes_plain_strings_and_names_a_wrong_item(smollm2):
    _, tok = smollm2
    store = build_datastore(["def f(x):", "return x + 1"], tok, progress=False)
    assert store.num_documents == 2
    pairs = build_datastore([("a", "def f(x):"), ("b", "return x + 1")], tok, progress=False)
    assert len(pairs) == len(store)
    with pytest.raises(TypeError, match="document 1 is int"):
        build_datastore(["fine", 42], tok, progress=False)
