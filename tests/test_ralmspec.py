"""RaLMSpec: output token-identical to the iterative RaLM baseline for every retriever and every option, on
real questions with a real model and real indexes; the OS³ scheduler against hand-computed optima; the
retrievers' cache scoring agrees with their own search."""

from __future__ import annotations

import inspect
from concurrent.futures import ThreadPoolExecutor

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
from rasd.ralmspec.ralm import RaLMStats, stride_policy
from rasd.ralmspec.speculation import FixedStride, speculate


def _scheduler_at(a: float, b: float, gamma_trials: tuple[int, int], **kw) -> OS3Scheduler:
    """A scheduler that has measured guesses of ``a`` seconds with free commits, verifications of ``b``
    seconds whatever the batch (the paper's assumptions), and (right, wrong) verified guesses."""
    right, wrong = gamma_trials
    sched = OS3Scheduler(allow_plain=False, window=right + wrong, prior_trials=0, **kw)
    sched.update(a, b, matched=right, missed=False, stride=5, commit=0.0)
    for _ in range(wrong):
        sched.update(a, b, matched=0, missed=True, stride=5, commit=0.0)
    return sched


def test_os3_hand_computed_optima():
    assert _scheduler_at(0.22, 4.3, (3, 2)).stride() == 5  # the paper's worked example, γ = 0.6
    assert _scheduler_at(0.22, 1e-4, (3, 2)).stride() == 1  # free verification: verify every stride
    assert _scheduler_at(0.22, 4.3, (0, 5)).stride() == 1  # speculation never right
    # The async objective by hand, before any overlapped round: w(1) = max(a, b) = 0.5 (the ideal overlap), a
    # miss (40 %) costs the thrown-away guess again, (s - 1)·a + w + (1 - γ)(g + a) with g = 0.
    sched = _scheduler_at(0.5, 0.3, (3, 2), async_verify=True)
    assert sched.rate(1, overlapped=True) == pytest.approx(1 / (0.5 + 0.4 * 0.5))
    assert sched.rate(1, overlapped=False) == pytest.approx(1 / (0.5 + 0.3))


def test_os3_measures_overlapped_rounds_and_stops_overlapping_where_they_are_slower():
    """KNN-LM over 94k entries on 2 cores (measured): a commit (one LM forward) 0.045 s, a guess 0.001 s, a
    datastore query 0.010 s, every guess right. Ideally a round overlaps the query with a guess; but the
    worker's search and the LM's forward share 2 cores, and an overlapped pair took longer than the two one
    after the other. The measured w must send OS³ back to synchronous rounds; an overlap that hides the
    query must keep it."""

    def after_round(w: float) -> OS3Scheduler:
        sched = OS3Scheduler(async_verify=True, max_stride=16)
        sched.update_plain(0.010, 0.045, None)
        assert sched.overlap()  # before any overlapped round: the ideal overlap, so async is tried
        s = sched.stride()
        sched.update(0.046, w, matched=s, missed=False, stride=s, commit=0.045, overlapped=True)
        return sched

    contended = after_round(0.046 + 0.010 + 0.030)  # 30 ms longer than a guess and a query in turn
    assert not contended.overlap() and contended.stride() > 0  # synchronous rounds, still speculating
    assert contended.rate(contended.stride()) > contended.rate(contended.stride(), overlapped=True)
    hidden = after_round(0.047)  # the query hidden behind the guess
    assert hidden.overlap() and hidden.stride() > 0
    assert list(contended.verifications) == [(1, 0.010)]  # w is kept apart from the search times b
    warm = stride_policy("os3", async_verify=True, previous=contended)
    assert not warm.overlap() and list(warm.overlaps) == list(contended.overlaps)


def test_os3_remembers_what_batches_cost_through_a_run_of_plain_steps():
    """KNN-LM over a faiss IVF index at 1M entries (measured): a commit 0.038 s, a one-query search 0.007 s,
    and a batch costs about 0.007 s per query (faiss probes per query), so rounds cannot pay and OS³ takes
    plain steps. Its fit of b(s) must still know the slope after many plain steps: when the batch sizes
    had left the window, b(s) fell back to b(1) at every s, rounds looked free, and one was taken (and
    lost) every 16 plain steps (ivf_os3 0.965x of the baseline)."""
    sched = OS3Scheduler(max_stride=16, shadow_every=1, margin=0.03)  # every shadow guess right: γ 0.98
    sched.update_plain(0.007, 0.038, None)
    sched.update(0.0385, 0.007 * 4, matched=3, missed=True, stride=4, commit=0.038)
    assert sched.stride() == 0  # 4 queries cost 4 single ones: plain steps
    for i in range(sched.forget_batches - 1):
        sched.update_plain(0.007, 0.038, hit=True if sched.shadow() else None)
        assert sched.stride() == 0, f"a round after {i + 1} plain steps"
    assert sched.verify_cost(8) == pytest.approx(0.056, rel=0.05)
    sched.update_plain(0.007, 0.038, None)  # then the batch times are forgotten: one probe round is allowed
    assert sched.verify_cost(8) == pytest.approx(0.007) and sched.stride() > 0


class _Sequence:
    """A toy speculative task: the knowledge base answers position i with ``truth[i]``, the cache guesses
    ``guesses[i]``; commit appends, rollback truncates. The loop must return exactly ``truth``."""

    def __init__(self, truth: list[int], guesses: list[int]) -> None:
        self.truth, self.guesses, self.out = truth, guesses, []

    def done(self) -> bool:
        return len(self.out) == len(self.truth)

    def context(self) -> int:
        return len(self.out)

    def query(self, context: int) -> int:
        return context

    def guess(self, context: int) -> int:
        return self.guesses[context]

    def answer(self, context: int, result: int) -> int:
        return result

    def commit(self, value: int) -> int:
        self.out.append(value)
        return len(self.out) - 1

    def rollback(self, mark: int) -> int:
        dropped = len(self.out) - mark
        del self.out[mark:]
        return dropped

    def search(self, queries: list[int]) -> list[int]:
        return [self.truth[q] for q in queries]

    def prepare(self, queries: list[int]) -> None:
        pass

    def learn(self, result: list[int]) -> None:
        pass


def test_speculate_loop_is_exact_and_overlaps_only_when_the_policy_says_so():
    rng = np.random.default_rng(0)
    pool = ThreadPoolExecutor(max_workers=1)
    for trial in range(40):
        n = int(rng.integers(1, 60))
        truth = rng.integers(0, 4, n).tolist()
        guesses = [t if rng.random() < 0.8 else t + 1 for t in truth]
        for policy in (stride_policy(int(rng.integers(1, 6))), stride_policy("os3", async_verify=True)):
            task, stats = _Sequence(truth, guesses), RaLMStats()
            sync = trial % 2 == 0
            if sync:
                policy.overlap = lambda: False  # the policy judged overlapping slower
            assert speculate(task, policy, stats, pool) == truth == task.out
            rounds = stats.kb_calls - stats.plain_steps
            assert rounds > 0 or n == 1
            if sync:
                assert stats.overlapped_rounds == 0
            elif isinstance(policy, FixedStride) and n > 8:  # the first round (<= 5 guesses) cannot end it
                assert 0 < stats.overlapped_rounds <= rounds


def test_os3_gamma_estimate_is_windowed_capped_and_has_a_prior():
    sched = OS3Scheduler(window=4, prior_trials=0, gamma_cap=0.6)
    sched.update(0.1, 1.0, matched=3, missed=True)
    assert sched.gamma == pytest.approx(0.6)  # 3 / (3 + 1) = 0.75, capped
    sched.update(0.1, 1.0, matched=0, missed=True)
    assert sched.gamma == pytest.approx(0.5)  # the oldest right guess left the window of 4 guesses
    sched.update(0.1, 1.0, matched=1, missed=True)
    assert sched.gamma == pytest.approx(1 / 4)
    # One early miss with a prior of 4 guesses right at the cap: (0 + 4 * 0.95) / (1 + 4), not 0.
    early = OS3Scheduler(gamma_cap=0.95, prior_trials=4)
    assert early.gamma == pytest.approx(0.95)
    early.update(0.1, 1.0, matched=0, missed=True)
    assert early.gamma == pytest.approx(3.8 / 5)


def test_os3_smooths_costs_and_needs_a_margin_to_leave_plain_steps():
    """One fast LM forward must not flip the choice, and near break-even plain steps stay plain."""
    sched = OS3Scheduler(gamma_cap=0.95, max_stride=8, smoothing=0.25)
    sched.update_plain(0.02, 0.06, None)
    sched.update(0.061, 0.03, matched=1, missed=True, stride=2, commit=0.06)
    assert sched.g == pytest.approx(0.06) and sched.c == pytest.approx(0.001)
    sched.update_plain(0.02, 0.02, None)  # one commit 3x faster than the others
    assert sched.g == pytest.approx(0.06 + 0.25 * (0.02 - 0.06))
    # Force plain, then put speculation just above break-even: it must clear the margin.
    sched.current = 0
    rates = sched.rates()
    best = rates[1:].max()
    sched.margin = best / rates[0] - 1 + 1e-3
    sched._choose()
    assert sched.stride() == 0
    sched.margin = best / rates[0] - 1 - 1e-3
    sched._choose()
    assert sched.stride() > 0


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
    sched = OS3Scheduler(gamma_cap=0.95, window=4, prior_trials=0)
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


def test_os3_warm_starts_from_the_previous_request():
    first = stride_policy("os3", gamma_cap=0.95, max_stride=16)
    first.update_plain(0.2, 0.05, None)
    for _ in range(3):
        first.update(0.052, 0.21, matched=first.stride(), missed=False, stride=first.stride(), commit=0.05)
    assert first.stride() > 2
    cold = stride_policy("os3", gamma_cap=0.95, max_stride=16)
    warm = stride_policy("os3", gamma_cap=0.95, max_stride=16, previous=first)
    assert cold.stride() == 2  # the initial probe
    assert warm.stride() == first.stride() and warm.gamma == first.gamma and warm.g == first.g
    assert list(warm.verifications) == list(first.verifications)
    warm.update(0.052, 0.21, matched=0, missed=True, stride=warm.stride(), commit=0.05)
    assert len(first.trials) < len(warm.trials)  # the previous request's record is copied, not shared
    assert stride_policy("os3", previous=stride_policy(3)).stride() == 2  # a fixed stride has nothing to give
    # A request after plain steps keeps to them unless speculating clears the margin: rates barely above
    # plain's (within the margin) must not open the next request with rounds.
    first.current = 0
    rates = first.rates()
    gain = rates[1:].max() / rates[0] - 1.0
    assert gain > 0
    for margin, speculates in ((2 * gain, False), (gain / 2, True)):
        after_plain = OS3Scheduler(gamma_cap=0.95, max_stride=16, margin=margin)
        after_plain.warm_start(first)
        assert (after_plain.stride() > 0) == speculates


def test_os3_speculates_where_measured_guesses_are_right_and_retrieval_is_a_real_share():
    """Milvus FLAT at 44k passages (measured): a stride's decoding g = 0.5 s, a knowledge-base call 0.085 s
    whatever the batch, a cache guess 0.013 s, every prefetched guess right; fixed strides of 3 ran 1.13x
    faster than plain steps. Under the paper's cap γ <= 0.6 a round always expects a 40 % miss (a commit
    thrown away) and OS³ stays plain; RaLMSpec's cap lets the measured guesses speak."""
    from rasd.ralmspec.ralm import RaLMSpec

    def measured(cap: float) -> OS3Scheduler:
        sched = OS3Scheduler(gamma_cap=cap, max_stride=16)
        sched.update_plain(0.085, 0.5, None)
        for _ in range(4):
            s = max(sched.stride(), 3)
            sched.update(0.513, 0.085, matched=s, missed=False, stride=s, commit=0.5)
        return sched

    assert measured(0.6).stride() == 0
    assert measured(0.98).stride() > 1
    assert inspect.signature(RaLMSpec).parameters["gamma_cap"].default == 0.98


def test_stride_policy_validates_and_bounds_the_stride():
    fixed = stride_policy(5)
    fixed.update(0.1, 1.0, matched=5, missed=False)
    assert fixed.stride() == 5
    bounded = stride_policy("os3", async_verify=True, max_stride=3)
    bounded.update(1e-4, 10.0, matched=9, missed=False)  # cheap speculation, dear verification: wants s > 3
    assert bounded.stride() == 3 and bounded.async_verify
    for bad, cap in ((0, None), ("auto", None), (17, 16), (2.0, None)):
        with pytest.raises(ValueError, match="scheduler must be 'os3' or a stride count"):
            stride_policy(bad, max_stride=cap)
    for cap in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="gamma_cap must be in"):
            stride_policy(3, gamma_cap=cap)
        with pytest.raises(ValueError, match="gamma_cap must be in"):
            OS3Scheduler(gamma_cap=cap)


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
    # OS³ overlaps only where it measures overlapping as faster; a fixed stride always does.
    "async_fixed": {"prefetch": 20, "scheduler": 3, "async_verify": True},
}


@pytest.mark.real_model
@pytest.mark.parametrize("kind", ["flat", "hnsw", "bm25"])
@pytest.mark.parametrize("reuse_kv", [False, True])
def test_ralmspec_is_token_identical_to_the_baseline(smollm2, kb, kind, reuse_kv):
    model, tok = smollm2
    config = RaLMConfig(max_new_tokens=24, reuse_kv=reuse_kv)
    base = IterativeRaLM(model, tok, kb[kind], config)
    # Every scheduling variant on the exact index; the approximate and sparse ones (which change only what
    # a knowledge-base call returns) with the variants the checks below need: the one-entry prefetch (its
    # cache misses: rollbacks), OS³ and the overlapped fixed stride.
    names = VARIANTS if kind == "flat" else ("plain", "os3", "async_fixed")
    specs = {name: RaLMSpec(model, tok, kb[kind], config, **VARIANTS[name]) for name in names}
    hits = misses = overlapped = 0
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
            overlapped += out.stats.overlapped_rounds if name == "async_fixed" else 0
    assert hits > 0  # the cache did speculate correctly sometimes
    assert misses > 0  # and wrongly sometimes: rollbacks were exercised
    assert overlapped > 0  # the worker thread's verification was exercised
    assert specs["os3"]._last_policy.gamma_cap == specs["os3"].gamma_cap == 0.98  # the cap reaches OS³
