"""RaLMSpec: output token-identical to the iterative RaLM baseline for every retriever and every option, on
real questions with a real model and real indexes; the OS³ scheduler against hand-computed optima; the
retrievers' cache scoring agrees with their own search."""

from __future__ import annotations

import numpy as np
import pytest

from rasd.ralmspec import (
    BM25Retriever,
    DenseRetriever,
    IterativeRaLM,
    MiniLMEncoder,
    OS3Scheduler,
    RaLMConfig,
    RaLMSpec,
    load_retriever,
    passages,
    questions,
)


def test_os3_hand_computed_optima():
    assert OS3Scheduler.optimal_stride(0.22, 4.3, 0.6) == 5  # the paper's worked example
    assert OS3Scheduler.optimal_stride(0.22, 1e-4, 0.6) == 1  # free verification: verify every stride
    assert OS3Scheduler.optimal_stride(0.22, 4.3, 0.0) == 1  # speculation never right
    # By brute force over s for the async objective too.
    for a, b, g in [(0.1, 1.0, 0.5), (0.3, 0.2, 0.6), (0.05, 2.0, 0.4)]:
        for asy in (False, True):
            best = max(range(1, 17), key=lambda s: OS3Scheduler.objective(s, a, b, g, asy))
            assert OS3Scheduler.optimal_stride(a, b, g, asy) == best


def test_os3_gamma_estimate_is_windowed_and_capped():
    sched = OS3Scheduler(window=2)
    sched.update(0.1, 1.0, matched=3, missed=True)
    assert sched.gamma == pytest.approx(0.6)  # 3 / (3 + 1) = 0.75, capped
    sched.update(0.1, 1.0, matched=0, missed=True)
    sched.update(0.1, 1.0, matched=1, missed=True)  # the first round leaves the window
    assert sched.gamma == pytest.approx(1 / 3)


def test_os3_chooses_plain_steps_when_verification_does_not_batch():
    """b(s) = s·b(1) (faiss's flat loop): a round of s guesses costs at least what s plain steps cost, so OS³
    must stop speculating whatever γ is; with a flat b(s) (one pass over the keys for any batch) and right
    guesses it must speculate, with a stride > 1."""
    linear = OS3Scheduler(gamma_cap=0.95, max_stride=16)
    assert linear.stride() == 2  # the initial probe
    linear.update_plain(0.2, 0.05, None)  # the first (plain) step measured b(1)
    linear.update(0.052, 0.4, matched=2, missed=False, stride=2, commit=0.05)
    assert linear.verify_cost(8) == pytest.approx(1.6)
    assert linear.rate(0) == pytest.approx(1 / 0.25)
    # A round of 2 right guesses: 2 steps in 2 a + b(2) + (1 - γ^2) g.
    g = linear.gamma
    assert linear.rate(2) == pytest.approx((1 + g) / (2 * 0.052 + 0.4 + (1 - g * g) * 0.05))
    assert linear.stride() == 0
    flat = OS3Scheduler(gamma_cap=0.95, max_stride=16)
    flat.update_plain(0.2, 0.05, None)
    flat.update(0.052, 0.21, matched=4, missed=False, stride=4, commit=0.05)
    assert flat.stride() > 1


def test_os3_shadow_guesses_bring_speculation_back():
    sched = OS3Scheduler(gamma_cap=0.95, window=4)
    sched.update_plain(0.2, 0.05, None)
    sched.update(0.052, 0.21, matched=0, missed=True, stride=2, commit=0.05)
    assert sched.stride() == 0  # every guess wrong: plain steps
    shadows = [sched.shadow() for _ in range(8)]
    assert shadows == [False, False, False, True] * 2  # one plain step in 4 guesses first
    for _ in range(4):
        sched.update_plain(0.2, 0.05, hit=True)
    assert sched.gamma == pytest.approx(0.95) and sched.stride() > 1
    paper = OS3Scheduler(allow_plain=False)
    paper.update(0.052, 0.4, matched=0, missed=True, stride=2, commit=0.05)
    assert paper.stride() >= 1  # without allow_plain the scheduler always speculates


def test_stride_policy_validates_and_bounds_the_stride():
    from rasd.ralmspec.ralm import stride_policy

    fixed = stride_policy(5)
    fixed.update(0.1, 1.0, matched=5, missed=False)
    assert fixed.stride() == 5
    bounded = stride_policy("os3", async_verify=True, max_stride=3)
    bounded.update(1e-4, 10.0, matched=9, missed=False)  # cheap speculation, dear verification: wants s > 3
    assert bounded.stride() == 3 and bounded.async_verify
    for bad, cap in ((0, None), ("auto", None), (17, 16), (2.0, None)):
        with pytest.raises(ValueError, match="scheduler must be 'os3' or a stride count"):
            stride_policy(bad, max_stride=cap)


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="stride"):
        RaLMConfig(stride=0)
    with pytest.raises(ValueError, match="not a rasd retrieval index"):
        load_retriever("/nonexistent")


@pytest.fixture(scope="module")
def kb():
    """A real knowledge base: 500 English Wikipedia passages, three real indexes over it."""
    ps = passages(("wikipedia-en",), limit=500)
    enc = MiniLMEncoder()
    flat = DenseRetriever.build(ps, encoder=enc, progress=False)
    return {
        "flat": flat,
        "hnsw": DenseRetriever(ps, flat.embeddings, kind="hnsw", encoder=enc, hnsw_m=16, ef_search=16),
        "bm25": BM25Retriever.build(ps),
    }


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["flat", "hnsw", "bm25"])
def test_cache_scoring_agrees_with_search(kb, kind):
    r = kb[kind]
    qs = questions(4)
    ids, scores = r.search(qs, 5)
    for q, row, sc in zip(qs, ids, scores, strict=True):
        np.testing.assert_allclose(r.score(q, row.tolist()), sc, rtol=1e-4, atol=1e-4)


@pytest.mark.real_model
def test_bm25_cache_scoring_matches_full_corpus_scoring(kb):
    """score() binary-searches each query term's posting list for the cached documents only; it must give
    exactly the float32 scores of bm25s' own full-corpus scorer (what search ranks by)."""
    r = kb["bm25"]
    assert r._sorted_postings
    rng = np.random.default_rng(0)
    words = " ".join(r.passages[:100]).split()
    for _ in range(40):
        query = " ".join(rng.choice(words, int(rng.integers(1, 30))))
        doc_ids = rng.choice(len(r), int(rng.integers(1, 80)), replace=False)
        full = r.retriever.get_scores(r._tokens([query])[0] or ["zzzz"])  # unknown-only query: all zeros
        np.testing.assert_array_equal(r.score(query, doc_ids), full[doc_ids].astype(np.float32))
    assert not r.score("zzzzqqq xxyyzz", [0, 1]).any()


@pytest.mark.real_model
def test_index_save_and_load_round_trip(kb, tmp_path):
    for kind in ("hnsw", "bm25"):
        kb[kind].save(tmp_path / kind)
        loaded = load_retriever(tmp_path / kind, encoder=kb["flat"].encoder)
        qs = questions(3)
        assert (loaded.search(qs, 3)[0] == kb[kind].search(qs, 3)[0]).all()
    (tmp_path / "bm25" / "passages.json").write_text("[1, 2")  # truncated
    with pytest.raises(ValueError, match="not a rasd retrieval index"):
        load_retriever(tmp_path / "bm25")


VARIANTS = {
    "plain": {"prefetch": 1, "scheduler": 3},
    "prefetch": {"prefetch": 20, "scheduler": 3},
    "os3": {"prefetch": 20, "scheduler": "os3"},
    "async": {"prefetch": 20, "scheduler": "os3", "async_verify": True},
}


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["flat", "hnsw", "bm25"])
@pytest.mark.parametrize("reuse_kv", [False, True])
def test_ralmspec_is_token_identical_to_the_baseline(smollm2, kb, kind, reuse_kv):
    model, tok = smollm2
    config = RaLMConfig(max_new_tokens=24, reuse_kv=reuse_kv)
    base = IterativeRaLM(model, tok, kb[kind], config)
    specs = {name: RaLMSpec(model, tok, kb[kind], config, **kw) for name, kw in VARIANTS.items()}
    hits = misses = 0
    for q in questions(2):
        prompt = tok(f"Question: {q}\nAnswer:").input_ids
        ref = base.generate(prompt)
        assert ref.stats.strides == len(ref.documents) == ref.stats.kb_calls
        for name, spec in specs.items():
            out = spec.generate(prompt)
            assert out.tokens == ref.tokens, (kind, name, q)
            assert out.documents == ref.documents, (kind, name, q)
            hits += out.stats.hits
            misses += out.stats.misses
    assert hits > 0  # the cache did speculate correctly sometimes
    assert misses > 0  # and wrongly sometimes: rollbacks were exercised
