"""profile_verify and the cost curve the budget planner relies on."""

import pytest

from rasd.costmodel import CostCurve, profile_verify
from rasd.testing import tiny_model


def test_profile_verify_measures_every_size_and_restores_the_cache():
    model = tiny_model("qwen2")
    profile = profile_verify(model, tree_sizes=(4, 1, 2, 4), context_length=32, repeats=2)
    assert sorted(profile) == [1, 2, 4]
    assert all(t > 0 for t in profile.values())


@pytest.mark.real_model
def test_profile_verify_on_a_real_model(smollm2):
    model, _ = smollm2
    profile = profile_verify(model, tree_sizes=(1, 8), context_length=128, repeats=1)
    assert set(profile) == {1, 8} and min(profile.values()) > 0


def test_cost_curve_interpolates_and_extrapolates():
    curve = CostCurve((1, 2, 4, 8), (1.0, 1.0, 1.5, 2.5))
    assert curve(1) == 1.0 and curve(0) == 1.0
    assert curve(3) == pytest.approx(1.25)
    assert curve(16) == pytest.approx(2.5 + 8 * 0.25)
    assert curve.relative() == {1: 1.0, 2: 1.0, 4: 1.5, 8: 2.5}
    with pytest.raises(ValueError, match="increasing"):
        CostCurve((2, 1), (1.0, 1.0))
    with pytest.raises(ValueError):
        profile_verify(tiny_model(), tree_sizes=(0,))


def test_fast_path_serves_only_the_forward_sizes_where_it_was_faster(monkeypatch):
    """fastest_path_profile: the fast path then serves exactly the sizes where its whole-forward curve is
    lower, and the planner gets the cheaper cost at every size."""
    from rasd import costmodel
    from rasd.fastpath import FastPath

    model = tiny_model("qwen2")
    fast = FastPath(model)
    assert fast.serves(3)  # without a measured policy every eligible size is served
    curves = {False: {1: 1.0, 4: 2.0, 16: 3.0}, True: {1: 1.2, 4: 1.0, 16: 4.0}}
    monkeypatch.setattr(costmodel, "cached_profile", lambda m, s, c, *, fast_path: curves[fast_path is fast])
    assert costmodel.fastest_path_profile(model, fast) == {1: 1.0, 4: 1.0, 16: 3.0}
    assert [fast.serves(n) for n in (1, 2, 4, 8, 16, 32)] == [False, True, True, True, False, False]


def test_profile_verify_times_the_fast_path_at_every_size_whatever_its_policy(monkeypatch):
    from rasd.fastpath import FastPath

    model = tiny_model("qwen2")
    fast = FastPath(model)
    never = (lambda n: 0.0, lambda n: 1.0)  # stock cheaper at every size
    fast.row_policy = never
    entered = []
    enter = FastPath.__enter__
    monkeypatch.setattr(FastPath, "__enter__", lambda self: entered.append(1) or enter(self))
    profile_verify(model, tree_sizes=(1, 2), context_length=8, repeats=1, fast_path=fast)
    assert len(entered) == 4  # 2 sizes x (warm-up + 1 round), all inside the fast path
    assert fast.row_policy is never  # restored afterwards


def test_path_choice_runs_each_forward_size_on_its_fastest_path(monkeypatch):
    """PathChoice: per size the cheapest measured curve wins; the kernel path is never chosen beyond its
    max_rows nor for a prefill (there only plain torch and the torch bf16 backend compete)."""
    from rasd import costmodel
    from rasd.fastpath import FastPath, FastPathConfig

    model = tiny_model("qwen2")
    kernel = FastPath(model, FastPathConfig(weights="bf16", max_rows=16, calibrate=False))
    bf16 = FastPath(model, FastPathConfig(weights="bf16", backend="torch"))
    curves = {
        None: {1: 1.0, 4: 3.0, 16: 6.0, 64: 20.0},
        kernel: {1: 0.5, 4: 1.0, 16: 5.0, 64: 1.0},
        bf16: {1: 2.0, 4: 2.0, 16: 2.5, 64: 4.0},
    }
    monkeypatch.setattr(costmodel, "cached_profile", lambda m, s, c, *, fast_path: curves[fast_path or None])
    choice = costmodel.PathChoice(model, [kernel, bf16])
    names = {1: "kernel/bf16", 4: "kernel/bf16", 16: "torch/bf16", 64: "torch/bf16"}
    assert choice.names((1, 4, 16, 64)) == names
    assert choice.cost(4) == 1.0 and choice.cost(16) == 2.5
    assert choice.best(1, prefill=True) is None and choice.best(500, prefill=True) is bf16
    with choice.context(500, prefill=True):
        assert bf16.active and not kernel.active
    with choice.context(1):
        assert kernel.active and not bf16.active
