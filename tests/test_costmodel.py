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
