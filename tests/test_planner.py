"""The planner's acceptance model: per-kind path calibration against a simple reference on random trees."""

from __future__ import annotations

import numpy as np
import pytest

from rasd.costmodel import CostCurve
from rasd.planner import KINDS, AcceptanceModel, Planner, PlannerConfig, node_kinds
from rasd.tree import Source, TokenTree, path_products
from rasd.verify import Acceptance


def _random_tree(rng: np.random.Generator, n: int) -> TokenTree:
    """Random topological tree mixing draft nodes (draft probs), prompt/corpus matches of every length
    bucket and recycled nodes (count ratios)."""
    parents = np.array([rng.integers(-1, i) for i in range(n)], dtype=np.int32)
    sources = rng.choice([Source.DRAFT, Source.PROMPT, Source.CORPUS, Source.RECYCLE], size=n).astype(
        np.uint8
    )
    draft = np.where(sources == Source.DRAFT, rng.uniform(0.05, 1.0, n), np.nan)
    return TokenTree(
        rng.integers(0, 100, n),
        parents,
        scores=rng.uniform(0.1, 1.0, n),
        sources=sources,
        draft_probs=draft,
        match_lengths=np.where(sources & (Source.PROMPT | Source.CORPUS), rng.integers(1, 9, n), 0),
    )


def _accepted_path(rng: np.random.Generator, tree: TokenTree, keep: np.ndarray) -> Acceptance:
    """Walk down from the root: at each reached node take its first child whose coin (probability
    ``keep`` of the child's kind) comes up, else stop."""
    kind, _ = node_kinds(tree)
    path, node = [], -1
    while True:
        children = [i for i in range(len(tree)) if tree.parents[i] == node]
        nxt = next((c for c in children if rng.random() < keep[kind[c]]), None)
        if nxt is None:
            return Acceptance(path, [0] * (len(path) + 1))
        path.append(nxt)
        node = nxt


def test_path_calibration_matches_a_reference_and_never_outranks_a_parent():
    rng = np.random.default_rng(0)
    model = AcceptanceModel()
    empty = TokenTree.empty()
    assert model.path_probs(empty).shape == (0,)
    first = _random_tree(rng, 12)
    # Nothing observed: calibration 1, path probabilities are the plain products of node estimates.
    np.testing.assert_allclose(model.path_calibration(), 1.0)
    np.testing.assert_allclose(model.path_probs(first), path_products(first.parents, model.node_probs(first)))

    keep = np.full(len(KINDS), 0.8)
    keep[KINDS.index("prompt:3-5")] = keep[KINDS.index("corpus:1-2")] = 0.05  # retrieval that rarely holds
    predicted, accepted = np.zeros(len(KINDS)), np.zeros(len(KINDS))
    for _ in range(150):
        tree = _random_tree(rng, int(rng.integers(1, 20)))
        kind, _ = node_kinds(tree)
        raw = path_products(tree.parents, model.node_probs(tree))  # the reference: raw products
        acc = _accepted_path(rng, tree, keep)
        np.add.at(predicted, kind, raw)
        np.add.at(accepted, kind[acc.path], 1.0)
        model.observe(tree, acc)
    v = model.path_weight
    np.testing.assert_allclose(model.path_calibration(), (accepted + v) / (predicted + v))
    calib = model.path_calibration()

    for _ in range(20):
        tree = _random_tree(rng, int(rng.integers(1, 30)))
        kind, _ = node_kinds(tree)
        path = model.path_probs(tree)
        raw = path_products(tree.parents, model.node_probs(tree)) * calib[kind]
        assert np.all(path <= np.minimum(raw, 1.0) + 1e-12)
        for i, p in enumerate(tree.parents):
            if p >= 0:
                assert path[i] <= path[p] + 1e-12
        # Where the scaled product already sits at or below its parent, it is kept as is.
        fine = [i for i, p in enumerate(tree.parents) if p < 0 or raw[i] <= path[p]]
        np.testing.assert_allclose(path[fine], np.minimum(raw[fine], 1.0))


def test_calibrated_paths_predict_what_a_chain_of_retrieval_delivers():
    """A kind whose node estimates look fine but whose chains deliver less (per-request factors above 1
    compound along a chain): the calibrated path sum lands near what is accepted, the raw one does not."""
    rng = np.random.default_rng(1)
    model = AcceptanceModel()
    kind_id = KINDS.index("prompt:6+")

    def chain() -> TokenTree:
        return TokenTree(
            np.arange(6),
            np.arange(-1, 5),
            scores=np.full(6, 0.9),
            sources=np.full(6, Source.PROMPT),
            match_lengths=np.full(6, 8),
        )

    def run(requests: int) -> tuple[float, float, float]:
        raw_sum = cal_sum = acc_sum = 0.0
        for _ in range(requests):
            model.begin_request()
            good = rng.random() < 0.2  # a fifth of the requests repeat the prompt, the rest never do
            for _ in range(16):
                tree = chain()
                raw_sum += path_products(tree.parents, model.node_probs(tree)).sum()
                cal_sum += model.path_probs(tree).sum()
                depth = 6 if good else 0
                acc_sum += depth
                model.observe(tree, Acceptance(list(range(depth)), [0] * (depth + 1)))
        return raw_sum, cal_sum, acc_sum

    run(40)  # learn
    raw_sum, cal_sum, acc_sum = run(40)
    assert node_kinds(chain())[0][0] == kind_id
    raw_error, cal_error = abs(raw_sum / acc_sum - 1), abs(cal_sum / acc_sum - 1)
    assert raw_error > 0.08 and cal_error < raw_error / 2, (raw_sum, cal_sum, acc_sum)


def test_path_weight_smooths_towards_one():
    model = AcceptanceModel(path_weight=4.0)
    model.path_predicted[0], model.path_accepted[0] = 4.0, 0.0
    assert model.path_calibration()[0] == pytest.approx(0.5)
    assert model.path_calibration()[1] == pytest.approx(1.0)


def test_a_request_model_shares_what_is_learned_over_requests_and_keeps_its_own_factors():
    rng = np.random.default_rng(2)
    shared = AcceptanceModel(prior_weight=3.0, path_weight=5.0)
    row = shared.for_request()
    assert (row.prior_weight, row.path_weight) == (3.0, 5.0)
    tree = _random_tree(rng, 15)
    row.observe(tree, _accepted_path(rng, tree, np.full(len(KINDS), 0.9)))
    for name in ("accepted", "tested", "path_accepted", "path_predicted"):
        assert getattr(shared, name) is getattr(row, name), name  # the row taught the shared model
    assert shared.tested.sum() > 0 and shared.path_predicted.sum() > 0
    assert row.request_predicted.sum() > 0 and shared.request_predicted.sum() == 0  # factors: the row's own


def test_the_first_drafted_step_is_not_learned_from():
    """A process's first drafted step pays one-off costs; learned from, it made every drafted step look
    slow. The rate of drafted steps starts at the second, and skipping then compares against it once
    ``min_drafted_steps`` steps were learned."""
    planner = Planner(CostCurve((1, 16), (0.1, 0.4)))
    chain = TokenTree(
        np.arange(8),
        np.arange(-1, 7, dtype=np.int32),
        sources=np.full(8, Source.PROMPT, np.uint8),
        match_lengths=np.full(8, 8),
    )
    drafted = TokenTree(np.arange(6), np.arange(-1, 5, dtype=np.int32))
    six = Acceptance(list(range(5)), [0] * 6)  # 5 nodes + the bonus token
    planner.observe(drafted, six, draft_seconds=5.0, verify_seconds=0.1, drafted=True)  # cold: 1.2 tok/s
    assert planner.draft_rate is None and planner.draft_tokens is None
    assert planner.view().seconds_per_drafted_token is None
    assert planner.should_draft(chain, step=1)  # nothing learned yet: draft
    for _ in range(planner.config.min_drafted_steps):
        planner.observe(drafted, six, draft_seconds=0.01, verify_seconds=0.1, drafted=True)  # warm: 55 tok/s
    assert planner.draft_rate == pytest.approx(6 / 0.11)
    assert planner.draft_tokens == pytest.approx(6.0)
    assert planner.view().seconds_per_drafted_token == pytest.approx(0.11 / 6)
    # A verbatim 8-token chain alone: more tokens than a drafted step but a lower rate (about 35 tok/s
    # at T(9)), so the draft runs; against the cold rate it would have been skipped.
    alone = planner.trim(chain)
    assert planner.expected_tokens(alone) > 6
    assert planner.should_draft(chain, step=1)
    planner.draft_rate = 6 / 5.1
    assert not planner.should_draft(chain, step=1)


def test_one_unlucky_drafted_step_does_not_lock_the_draft_out():
    """A drafted step whose first guess missed commits one token, as a plain step does; one such step is
    no estimate of the draft. Until ``min_drafted_steps`` drafted steps were learned from, the draft runs
    every step (before, it was skipped until the next explored step: 15 plain steps on Spec-Bench's first
    question); once they all say the draft commits one token at a lower rate, skipping it is right."""
    planner = Planner(CostCurve((1, 16), (0.1, 0.4)))
    nothing = TokenTree.empty()  # the draft alone: no retrieval tree to fall back on
    drafted = TokenTree(np.arange(6), np.arange(-1, 5, dtype=np.int32))
    one = Acceptance([], [0])  # the first draft node rejected: the bonus token only
    planner.observe(drafted, one, draft_seconds=1.0, verify_seconds=0.1, drafted=True)  # not learned from
    for k in range(1, planner.config.min_drafted_steps + 1):
        assert planner.view().seconds_per_drafted_token is None
        assert all(planner.should_draft(nothing, step) for step in range(1, 16)), k
        planner.observe(drafted, one, draft_seconds=0.2, verify_seconds=0.1, drafted=True)
    assert planner.draft_tokens == pytest.approx(1.0)
    assert planner.view().seconds_per_drafted_token == pytest.approx(0.3)
    assert not planner.should_draft(nothing, step=1)  # one token at 3.3 tok/s vs ~9 tok/s plain
    assert planner.should_draft(nothing, step=planner.config.explore_every)  # still explored


def test_planner_config_rejects_a_bad_min_drafted_steps():
    with pytest.raises(ValueError, match="min_drafted_steps"):
        PlannerConfig(min_drafted_steps=0)
