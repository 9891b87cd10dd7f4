"""KNN-LM: the interpolation against a plain Python reference; the datastore built from real text with a
real model (save/load, bad input); speculative KNN-LM token-identical to KNN-LM on real prompts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rasd.ralmspec import KNNLM, KNNConfig, KNNDatastore, SpeculativeKNNLM, passages, questions
from rasd.ralmspec.knnlm import GUIDE_PROBE, _EntryCache, knn_probs, knn_token


def _reference_probs(hidden, logits, ids, keys, values, cfg):
    """λ·p_kNN + (1 - λ)·p_LM with plain Python loops."""
    lse = math.log(sum(math.exp(v) for v in logits))
    p = [(1 - cfg.lam) * math.exp(v - lse) for v in logits]
    ids = [i for i in ids if i >= 0]
    if ids:
        ds = [sum((float(a) - float(b)) ** 2 for a, b in zip(keys[i], hidden, strict=True)) for i in ids]
        ws = [math.exp(-(d - min(ds)) / cfg.temperature) for d in ds]
        for i, w in zip(ids, ws, strict=True):
            p[int(values[i])] += cfg.lam * w / sum(ws)
    return p


def test_knn_probs_and_token_match_a_python_reference_on_random_inputs():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n, d, vocab = int(rng.integers(1, 40)), int(rng.integers(1, 9)), int(rng.integers(2, 30))
        keys = rng.normal(size=(n, d)).astype(np.float32)
        values = rng.integers(0, vocab, size=n)
        store = KNNDatastore(keys, values)
        cfg = KNNConfig(
            k=int(rng.integers(1, 8)), lam=float(rng.uniform()), temperature=float(rng.uniform(0.1, 5))
        )
        hidden = rng.normal(size=d).astype(np.float32)
        logits = torch.from_numpy(rng.normal(size=vocab).astype(np.float32))
        ids = store.search(hidden[None], cfg.k)[0]
        if trial % 5 == 0:
            ids[-1] = -1  # padding is ignored
        expect = _reference_probs(hidden.tolist(), logits.tolist(), ids.tolist(), keys, values, cfg)
        got = knn_probs(hidden, logits, ids, store, cfg)
        np.testing.assert_allclose(got.numpy(), expect, rtol=1e-9, atol=1e-12)
        assert knn_token(hidden, logits, ids, store, cfg) == int(np.argmax(expect))


def test_datastore_search_is_exact_nearest_neighbours():
    rng = np.random.default_rng(1)
    keys = rng.normal(size=(300, 16)).astype(np.float32)
    store = KNNDatastore(keys, rng.integers(0, 50, 300))
    q = rng.normal(size=(5, 16)).astype(np.float32)
    brute = np.argsort(((keys[None] - q[:, None]) ** 2).sum(-1), axis=1)[:, :7]
    assert (store.search(q, 7) == brute).all()
    with pytest.raises(ValueError, match="queries must be"):
        store.search(q[:, :3], 2)
    with pytest.raises(ValueError, match="empty"):
        KNNDatastore(np.zeros((0, 4)), np.zeros(0))
    with pytest.raises(ValueError, match="index_kind"):
        KNNDatastore(keys, np.zeros(300), index_kind="annoy")


@pytest.fixture(scope="module")
def store(smollm2):
    """A real KNN-LM datastore: SmolLM2's hidden states over English Wikipedia passages."""
    model, tok = smollm2
    return KNNDatastore.build(model, tok, passages(("wikipedia-en",), limit=160), max_entries=12000)


@pytest.mark.real_model
def test_entry_cache_clear_forgets_every_entry_and_keeps_its_buffers():
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((600, 8)).astype(np.float32)
    store = KNNDatastore(keys, rng.integers(0, 50, 600))
    cache = _EntryCache(store, lookahead=2)
    cache.add(np.array([10, 20, -1]))
    assert len(cache) == 6  # each neighbour and the 2 entries after it; -1 (padding) ignored
    for i in range(150):
        cache.add(np.array([4 * i]))  # grows the buffers past their first size
    grown, held = cache._keys, len(cache)
    assert held > 256 and len(grown) >= held  # 3 of every 4 entries (and 21, 22): past the first 256
    cache.clear()
    assert len(cache) == 0 and not cache._seen.any() and cache._keys is grown
    cache.add(np.array([11]))  # entries seen before the clear are new again
    assert len(cache) == 3 and sorted(cache.search(keys[12], 3)) == [11, 12, 13]


def test_datastore_save_load_and_bad_input(smollm2, store, tmp_path, qwen_draft):
    model, _ = smollm2
    assert len(store) == 12000 and store.dim == model.config.hidden_size
    store.save(tmp_path / "kb")
    loaded = KNNDatastore.load(tmp_path / "kb")
    q = store.keys[:4] + 0.01
    assert (loaded.search(q, 5) == store.search(q, 5)).all()
    with pytest.raises(ValueError, match="built with"):
        KNNLM(qwen_draft[0], loaded)  # another model's hidden states are not these keys
    np.save(tmp_path / "kb" / "values.npy", store.values[:100])  # truncated copy
    with pytest.raises(ValueError, match="truncated"):
        KNNDatastore.load(tmp_path / "kb")
    with pytest.raises(ValueError, match="not a rasd KNN-LM datastore"):
        KNNDatastore.load(tmp_path / "missing")
    with pytest.raises(ValueError, match="prompt is empty"):
        KNNLM(model, store).generate([])


@pytest.mark.real_model
def test_build_into_resumes_after_an_interruption(smollm2, tmp_path, monkeypatch):
    """An interrupted on-disk build continues where it stopped and ends with the same store as an
    in-memory build; an unfinished build is never loaded, and another corpus is refused."""
    from rasd.ralmspec import knnlm

    model, tok = smollm2
    texts = passages(("wikipedia-en",), limit=12)
    kw = {"max_entries": 700, "batch_tokens": 256}
    want = KNNDatastore.build(model, tok, texts, **kw)
    real, calls = knnlm._hidden_states, []

    def dies_on_the_third_batch(m, windows):
        calls.append(len(windows))
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(m, windows)

    monkeypatch.setattr(knnlm, "_hidden_states", dies_on_the_third_batch)
    with pytest.raises(KeyboardInterrupt):
        KNNDatastore.build_into(tmp_path / "kb", model, tok, texts, **kw)
    with pytest.raises(ValueError, match="unfinished build_into"):
        KNNDatastore.load(tmp_path / "kb")
    with pytest.raises(ValueError, match="unfinished build of another"):
        KNNDatastore.build_into(tmp_path / "kb", model, tok, texts[1:], **kw)
    got = KNNDatastore.build_into(tmp_path / "kb", model, tok, texts, **kw)
    # It resumed after the two finished batches: the rerun computed only the windows they had not.
    assert sum(calls[3:]) == len(knnlm._windows(tok, texts, 512, 700)) - sum(calls[:2])
    assert len(got) == 700 and isinstance(got.keys, np.memmap) and got.index_kind == "exact"
    np.testing.assert_array_equal(got.values, want.values)
    np.testing.assert_allclose(got.keys, want.keys, rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="already holds a finished datastore"):
        KNNDatastore.build_into(tmp_path / "kb", model, tok, texts, **kw)


@pytest.mark.real_model
@pytest.mark.parametrize("index_kind", ["exact", "hnsw"])  # faiss flat: the same neighbours as exact
def test_speculative_knnlm_is_token_identical_to_knnlm(smollm2, store, index_kind):
    model, tok = smollm2
    kb = store if index_kind == "exact" else KNNDatastore(store.keys, store.values, index_kind=index_kind)
    cfg = KNNConfig(max_new_tokens=24)
    base = KNNLM(model, kb, cfg)
    specs = [
        SpeculativeKNNLM(model, kb, cfg, lookahead=8, scheduler="os3"),
        SpeculativeKNNLM(model, kb, cfg, lookahead=8, scheduler=4),
        SpeculativeKNNLM(model, kb, cfg, lookahead=0, scheduler=3),
        SpeculativeKNNLM(model, kb, cfg, lookahead=8, scheduler="os3", async_verify=True),
        SpeculativeKNNLM(model, kb, cfg, lookahead=0, scheduler=2, async_verify=True),
        SpeculativeKNNLM(model, kb, cfg, lookahead=8, scheduler=4, draft_tokens=6),
        SpeculativeKNNLM(model, kb, cfg, lookahead=8, scheduler="os3", async_verify=True, draft_tokens=4),
    ]
    if index_kind != "exact":  # HNSW changes only what a datastore call returns: the variants the checks
        specs = [specs[0], specs[1], specs[5], specs[6]]  # below need, and the overlapped drafting one
    # Real questions, and continuations of text that is in the datastore (where the cache should hit).
    texts = [f"Question: {q}\nAnswer:" for q in questions(2)]
    texts += [" ".join(p.split()[:30]) for p in passages(("wikipedia-en",), limit=160)[10:40:15]]
    hits = 0
    calls = {"spec": 0, "base": 0}
    forwards = {"draft": 0, "one": 0}
    changed = False
    plain_cfg = KNNConfig(max_new_tokens=24, lam=0.0)
    for text in texts:
        prompt = tok(text).input_ids
        ref = base.generate(prompt)
        assert ref.stats.kb_calls == len(ref.tokens)
        changed |= ref.tokens != KNNLM(model, kb, plain_cfg).generate(prompt).tokens
        for spec in specs:
            out = spec.generate(prompt)
            assert out.tokens == ref.tokens, (index_kind, spec.scheduler, spec.async_verify, text)
            hits += out.stats.hits
            if spec.scheduler == 4 and not spec.draft_tokens:
                calls["spec"] += out.stats.kb_calls
            if spec.scheduler == 4:  # the same stride with and without drafts
                forwards["draft" if spec.draft_tokens else "one"] += out.stats.lm_forwards
        calls["base"] += ref.stats.kb_calls
    assert hits > 0  # the entry cache predicted the datastore's neighbours
    assert calls["spec"] < calls["base"]  # and batched verification saved datastore calls
    assert changed  # the datastore changes what the LM says (λ = 0.25 is not a no-op)
    # Drafting from the corpus continuation saved LM forwards (the right guesses took drafted states).
    assert forwards["draft"] < 0.8 * forwards["one"]


@pytest.mark.real_model
def test_a_guide_index_joins_the_guesses_and_keeps_the_output(smollm2, store):
    """An approximate guide (IVF) keeps the output; an exact guide makes every guess right (so the guide's
    answer really reaches the guesses); a guide over other entries is refused."""
    model, tok = smollm2
    cfg = KNNConfig(max_new_tokens=24)
    base = KNNLM(model, store, cfg)
    ivf = KNNDatastore(store.keys, store.values, index_kind="ivf", ivf_probe=2)
    exact = KNNDatastore(store.keys, store.values, index_kind="exact")
    plain = SpeculativeKNNLM(model, store, cfg, lookahead=8, scheduler=6)
    guided = SpeculativeKNNLM(model, store, cfg, lookahead=8, scheduler=6, guide=ivf)
    oracle = SpeculativeKNNLM(model, store, cfg, lookahead=8, scheduler=6, guide=exact)
    misses = {"plain": 0, "oracle": 0}
    hits = 0
    for q in questions(3):
        prompt = tok(f"Question: {q}\nAnswer:").input_ids
        ref = base.generate(prompt).tokens
        assert guided.generate(prompt).tokens == ref
        for name, spec in (("plain", plain), ("oracle", oracle)):
            out = spec.generate(prompt)
            assert out.tokens == ref
            misses[name] += out.stats.misses
            hits += out.stats.hits if name == "oracle" else 0
    assert misses["plain"] > 0 and misses["oracle"] == 0 and hits > 0, (misses, hits)
    other = KNNDatastore(store.keys[:-1], store.values[:-1])
    with pytest.raises(ValueError, match="does not index the same entries"):
        SpeculativeKNNLM(model, store, cfg, guide=other)
    shuffled = KNNDatastore(store.keys[::-1].copy(), store.values[::-1].copy())
    with pytest.raises(ValueError, match="does not index the same entries"):
        SpeculativeKNNLM(model, store, cfg, guide=shuffled)
    with pytest.raises(TypeError, match="guide must be a KNNDatastore"):
        SpeculativeKNNLM(model, store, cfg, guide=store.index)
    with pytest.raises(ValueError, match='"ivf" or None'):
        SpeculativeKNNLM(model, store, cfg, guide="hnsw")
    # guide="ivf" builds the IVF guide over the store's own entries.
    named = SpeculativeKNNLM(model, store, cfg, lookahead=8, scheduler=6, guide="ivf")
    assert named.guide.index_kind == "ivf" and named.guide.ivf_probe == GUIDE_PROBE
    assert len(named.guide) == len(store) and named.guide.model_tag == store.model_tag
    assert named.generate(prompt).tokens == ref
