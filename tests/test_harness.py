"""The benchmark harness computes its statistics correctly (the numbers in RESULTS.md depend on it)."""

import json

import pytest

from benchmarks import harness


def test_summary_medians_and_quartiles():
    s = harness.Summary.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.n, s.median, s.mean, s.min, s.max) == (5, 3.0, 3.0, 1.0, 5.0)
    assert (s.q1, s.q3) == (2.0, 4.0)
    assert harness.Summary.of([2.0, 4.0]).median == 3.0
    assert harness.Summary.of([7.0]).q1 == 7.0
    with pytest.raises(ValueError):
        harness.Summary.of([])


def test_ratio_is_baseline_over_value():
    assert harness.ratio(2.0, 1.0) == 2.0
    assert harness.ratio(1.0, 4.0) == 0.25
    with pytest.raises(ValueError):
        harness.ratio(1.0, 0.0)


def test_mean_accepted_length():
    assert harness.mean_accepted_length([1, 3, 2, 2]) == 2.0
    with pytest.raises(ValueError):
        harness.mean_accepted_length([])


def test_interleave_rotates_order_and_discards_warmup():
    calls = []
    contenders = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    times = harness.interleave(contenders, repeats=3, warmup=1)
    assert calls == list("abc") + list("abc") + list("bca") + list("cab")
    assert {k: len(v) for k, v in times.items()} == {"a": 3, "b": 3, "c": 3}


def test_write_results_records_environment(tmp_path):
    rows = [{"contender": "plain", "speedup": 1.0}, {"contender": "rasd", "speedup": 2.345}]
    json_path, md_path = harness.write_results("demo", {"rows": rows}, rows, out_dir=tmp_path)
    payload = json.loads(json_path.read_text())
    assert payload["rows"][1]["speedup"] == 2.345
    assert {"torch", "cpu", "cores", "rasd"} <= set(payload["environment"])
    table = md_path.read_text()
    assert "| contender | speedup |" in table and "| rasd | 2.35 |" in table


def test_command_line_is_recorded_and_quoted(tmp_path):
    command = harness.command_line("benchmarks.bench_e2e", ["--families", "code", "--name", "a b"])
    assert command == "python -m benchmarks.bench_e2e --families code --name 'a b'"
    json_path, _ = harness.write_results("cmd", {"rows": []}, [{"x": 1}], out_dir=tmp_path, command=command)
    assert json.loads(json_path.read_text())["command"] == command
