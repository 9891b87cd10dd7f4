"""profile_verify, the cached cost curves and the forward plan built on them."""

import json
import logging

import pytest
import torch

from rasd import costmodel
from rasd.costmodel import CostCurve, architecture_key, profile_verify
from rasd.fastpath import FastPath, FastPathConfig, ForwardPlan
from rasd.testing import tiny_model
from rasd.verify import TargetSession


def test_profile_verify_measures_every_size_and_restores_the_cache(monkeypatch):
    model = tiny_model("qwen2")
    lengths = []
    discard = TargetSession.discard

    def recording_discard(self):
        discard(self)
        lengths.append(self.cache.get_seq_length())

    monkeypatch.setattr(TargetSession, "discard", recording_discard)
    profile = profile_verify(model, tree_sizes=(4, 1, 2, 4), context_length=32, repeats=2)
    assert sorted(profile) == [1, 2, 4]
    assert all(t > 0 for t in profile.values())
    # Every measurement starts from the same 31 cached tokens: the tree entries are dropped each time.
    assert lengths and set(lengths) == {31}


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


def test_forward_plan_runs_each_size_on_its_fastest_path(monkeypatch):
    """Per size the cheapest measured curve wins; the kernel path is never chosen beyond its max_rows nor
    for a prefill (there only plain torch and the torch bf16 backend compete)."""
    model = tiny_model("qwen2")
    kernel = FastPath.for_model(model, FastPathConfig(weights="bf16", max_rows=16))
    bf16 = FastPath.for_model(model, FastPathConfig(weights="bf16", backend="torch"))
    curves = {
        None: {1: 1.0, 4: 3.0, 16: 6.0, 64: 20.0},
        kernel: {1: 0.5, 4: 1.0, 16: 5.0, 64: 1.0},
        bf16: {1: 2.0, 4: 2.0, 16: 2.5, 64: 4.0},
    }
    monkeypatch.setattr(costmodel, "cached_profile", lambda m, fp, **kw: curves[fp])
    plan = costmodel.forward_plan(model, [kernel, bf16], threads=1, refresh=True)
    names = {1: "kernel/bf16", 4: "kernel/bf16", 16: "torch/bf16", 64: "torch/bf16"}
    assert plan.names((1, 4, 16, 64)) == names
    assert plan.cost(4) == 1.0 and plan.cost(16) == 2.5
    assert plan.path(1, prefill=True) is None and plan.path(500, prefill=True) is bf16
    assert plan.profile() == {1: 0.5, 4: 1.0, 16: 2.5, 64: 4.0}
    assert costmodel.forward_plan(model, [kernel, bf16], threads=1) is plan  # one plan per model


def test_decode_threads_are_set_once_and_restored():
    plan = ForwardPlan(threads=1)
    before = torch.get_num_threads()
    with plan.decode_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with ForwardPlan().decode_threads():
        assert torch.get_num_threads() == before


def test_cached_curves_do_not_depend_on_where_the_model_was_loaded_from(tmp_path, monkeypatch, caplog):
    """The cache key is the architecture's shape (and the machine), not the checkpoint's directory: the
    same model loaded from another path reuses the measurement; a different shape does not. A miss logs
    one line saying that rasd measures the machine."""
    monkeypatch.setenv("RASD_CACHE", str(tmp_path))
    a, b = tiny_model("qwen2", seed=1), tiny_model("qwen2", seed=2)
    a.config._name_or_path, b.config._name_or_path = "/models/one", "/elsewhere/two"
    assert architecture_key(a) == architecture_key(b)
    calls = []
    real = costmodel.profile_verify
    monkeypatch.setattr(costmodel, "profile_verify", lambda *x, **k: calls.append(1) or real(*x, **k))
    with caplog.at_level(logging.WARNING, logger="rasd"):
        first = costmodel.cached_profile(a, None, threads=None)
    assert len(calls) == 1 and any("measuring" in r.getMessage() for r in caplog.records)
    assert costmodel.cached_profile(b, None, threads=None) == first and len(calls) == 1
    wider = tiny_model("qwen2", hidden_size=128)
    costmodel.cached_profile(wider, None, threads=None)
    assert len(calls) == 2
    files = list((tmp_path / "costmodel").glob("*.json"))
    assert len(files) == 2 and all(json.loads(f.read_text()) for f in files)


def test_rasd_calibrate_measures_ahead_of_time(tmp_path, monkeypatch, capsys):
    """`rasd calibrate DIR` stores the full curves a generator then reads without measuring again."""
    from rasd.cli import main
    from rasd.generate import SpeculativeGenerator

    monkeypatch.setenv("RASD_CACHE", str(tmp_path / "cache"))
    model = tiny_model("qwen2", seed=3)
    model.save_pretrained(tmp_path / "tiny")
    assert main(["calibrate", str(tmp_path / "tiny")]) == 0
    table = capsys.readouterr().out
    assert "T(n)/T(1)" in table and len(table.strip().splitlines()) == 1 + 7  # sizes 1..64
    calls = []
    monkeypatch.setattr(costmodel, "profile_verify", lambda *a, **k: calls.append(1) or {1: 1.0})
    from transformers import AutoModelForCausalLM

    again = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny", attn_implementation="sdpa").eval()
    SpeculativeGenerator(again, prompt_lookup=True)
    assert calls == []  # every curve came from the cache rasd calibrate wrote
