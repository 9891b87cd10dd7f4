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


def _e2e_record(family, prompt, contender, seconds, steps=None, identical=True):
    stats = None
    if steps is not None:
        stats = {"tokens_per_step": steps, "accepted_by_source": {"draft": sum(steps) - len(steps)}}
    return {
        "family": family,
        "prompt": prompt,
        "contender": contender,
        "seconds": seconds,
        "tokens": 10,
        "stats": stats,
        "identical": identical,
    }


def test_e2e_summary_ratios_spread_and_accepted_lengths():
    """bench_e2e's table, by hand: totals ratio, paired per-prompt spread, accepted length per step."""
    from benchmarks import bench_e2e

    records = [
        _e2e_record("code", "c1", "hf_plain", 10.0),
        _e2e_record("code", "c2", "hf_plain", 20.0),
        _e2e_record("chat", "h1", "hf_plain", 8.0),
        _e2e_record("code", "c1", "plain_fast", 5.0, [1] * 10),
        _e2e_record("code", "c2", "plain_fast", 10.0, [1] * 10),
        _e2e_record("chat", "h1", "plain_fast", 4.0, [1] * 10),
        _e2e_record("code", "c1", "rasd", 2.0, [4, 4, 2]),
        _e2e_record("code", "c2", "rasd", 10.0, [2, 2, 2, 2, 2]),
        _e2e_record("chat", "h1", "rasd", 8.0, [1] * 10, identical=False),
    ]
    contenders = ["hf_plain", "plain_fast", "rasd"]
    payload = {"families": ["code", "chat"], "contenders": contenders, "records": records}
    rows = {(r["family"], r["contender"]): r for r in bench_e2e.summarize(payload)}
    code = rows[("code", "rasd")]
    assert code["speed-up"] == pytest.approx(30 / 12)
    assert (code["per-prompt median"], code["per-prompt min"], code["per-prompt max"]) == (3.5, 2.0, 5.0)
    assert code["vs plain_fast"] == pytest.approx(15 / 12)
    assert code["accepted length"] == pytest.approx(20 / 8)
    assert code["accepted by source"] == "draft:12"
    assert code["tokens/s"] == pytest.approx(20 / 12)
    chat = rows[("chat", "rasd")]
    assert (chat["speed-up"], chat["accepted length"], chat["identical"]) == (1.0, 1.0, "0/1")
    mean = rows[("mean", "rasd")]
    assert mean["speed-up"] == pytest.approx((2.5 + 1.0) / 2)  # every family weighs the same
    assert mean["per-prompt median"] == 2.0  # over all prompts: 5, 2, 1
    assert mean["accepted length"] == pytest.approx((2.5 + 1.0) / 2)
    assert mean["identical"] == "2/3"
    assert rows[("mean", "hf_plain")]["speed-up"] == 1.0


def test_e2e_summary_pairs_runs_within_a_family():
    """DocQA and Summary prompts share page ids: each family's runs pair with that family's baseline."""
    from benchmarks import bench_e2e

    records = [
        _e2e_record("docqa", "asyncio.rst", "hf_plain", 36.0),
        _e2e_record("docqa", "asyncio.rst", "rasd", 24.0, [2] * 5),
        _e2e_record("summary", "asyncio.rst", "hf_plain", 27.0),
        _e2e_record("summary", "asyncio.rst", "rasd", 27.0, [1] * 10),
    ]
    payload = {"families": ["docqa", "summary"], "contenders": ["hf_plain", "rasd"], "records": records}
    rows = {(r["family"], r["contender"]): r for r in bench_e2e.summarize(payload)}
    assert rows[("docqa", "hf_plain")]["speed-up"] == 1.0
    assert rows[("docqa", "rasd")]["speed-up"] == pytest.approx(1.5)
    assert rows[("summary", "rasd")]["speed-up"] == pytest.approx(1.0)


def test_exact_bf16_summary_pairs_runs_by_prompt_and_round():
    """bench_exact_bf16's table, by hand: totals ratios end to end and after the first token, the smallest
    paired per-prompt ratio, tokens per step and the identical count, each run paired with HF's run of the
    same prompt and round."""
    from benchmarks import bench_exact_bf16

    def rec(rnd, prompt, name, seconds, ttft, tokens, steps):
        return {
            "round": rnd,
            "prompt": prompt,
            "contender": name,
            "seconds": seconds,
            "ttft": ttft,
            "tokens": tokens,
            "steps": steps,
        }

    records = [
        rec(0, "a", "hf_plain", 10.0, 2.0, [1, 2, 3, 4], 4),
        rec(0, "a", "plain_bf16", 5.0, 1.0, [1, 2, 3, 4], 4),
        rec(0, "b", "hf_plain", 20.0, 4.0, [5, 6], 2),
        rec(0, "b", "plain_bf16", 10.0, 2.0, [5, 7], 1),
        rec(1, "a", "hf_plain", 12.0, 2.0, [1, 2, 3, 4], 4),
        rec(1, "a", "plain_bf16", 12.0, 4.0, [1, 2, 3, 4], 2),
    ]
    rows = {r["contender"]: r for r in bench_exact_bf16.summarize(records)}
    mine = rows["plain_bf16"]
    assert mine["end to end"] == pytest.approx(42 / 27)
    assert mine["decode phase"] == pytest.approx((8 + 16 + 10) / (4 + 8 + 8))
    assert mine["per-prompt e2e min"] == pytest.approx(1.0)
    assert mine["per-prompt decode min"] == pytest.approx(10 / 8)
    assert mine["tokens/step"] == pytest.approx(10 / 7)
    assert mine["identical"] == "2/3"
    assert rows["hf_plain"]["end to end"] == 1.0 and set(rows) == {"hf_plain", "plain_bf16"}


def test_ralmspec_summary_pairs_runs_by_question_and_round():
    from benchmarks import bench_ralmspec

    def rec(contender, question, seconds, **stats):
        base = {"time_retrieval": 0.0, "kb_calls": 1, "hits": 0, "misses": 0, "chosen_strides": []}
        return {
            "size": 1000,
            "retriever": "flat",
            "kb_entries": 1000,
            "index_ms": 0.5,
            "question": question,
            "repeat": 0,
            "contender": contender,
            "seconds": seconds,
            "stats": base | stats,
            "identical": True,
        }

    records = [
        rec("baseline", 0, 4.0, time_retrieval=0.4, kb_calls=4),
        rec("baseline", 1, 2.0, time_retrieval=0.2, kb_calls=2),
        rec("+async", 0, 2.0, hits=3, misses=1, chosen_strides=[2], kb_calls=2),
        rec("+async", 1, 2.0, chosen_strides=[4], kb_calls=1),
    ]
    rows = bench_ralmspec.summarize({"sizes": [1000], "records": records})
    spec = next(r for r in rows if r["contender"] == "+async")
    assert spec["speed-up"] == pytest.approx(6 / 4)
    assert (spec["per-run median"], spec["per-run min"], spec["per-run max"]) == (1.5, 1.0, 2.0)
    assert spec["hit rate"] == 0.75 and spec["mean stride"] == 3.0 and spec["kb calls"] == 1.5
    assert spec["retrieval share (baseline)"] == pytest.approx(0.6 / 6)
    assert spec["kb query ms (baseline)"] == pytest.approx(100.0)
    assert spec["vs baseline_kv"] is None and spec["identical"] == "2/2"
