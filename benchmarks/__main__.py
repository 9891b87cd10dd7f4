"""Run the benchmark suite and regenerate ``benchmarks/RESULTS.md`` from its JSON.

    python -m benchmarks run --profile quick     # what RESULTS.md shows: ~2 h on a 2-core CPU
    python -m benchmarks run --profile full      # the reported numbers (hours on a 2-core CPU)
    python -m benchmarks report                  # only rebuild RESULTS.md from benchmarks/results/*.json

Every number in RESULTS.md is read from the JSON files the benchmark scripts wrote; nothing is typed in.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks import gpu_report
from benchmarks.harness import RESULTS_DIR, markdown_table

REPORT = Path(__file__).with_name("RESULTS.md")

PROFILES: dict[str, dict[str, list[str]]] = {
    "quick": {
        "verify": ["--repeats", "3"],
        "exact_bf16": ["--n", "1", "--repeats", "1"],
        "datastore": ["--sizes", "1000000,4000000", "--queries", "100"],
        "e2e": ["--profile", "quick", "--name", "e2e"],
        "first_call": [],
        "ralmspec": ["--sizes", "1000,4000", "--questions", "6", "--max-new-tokens", "32"],
        "knnlm": ["--entries", "100000,300000,1000000", "--questions", "4"],
        "specbench": ["--profile", "quick", "--name", "specbench"],
        "batch": ["--batches", "1,4", "--max-new-tokens", "48", "--repeats", "1"],
        "vllm": ["--n", "2", "--repeats", "1", "--max-new-tokens", "48"],
    },
    "full": {
        "verify": ["--repeats", "5"],
        "exact_bf16": ["--repeats", "2"],
        "datastore": [],
        "e2e": ["--profile", "full", "--name", "e2e"],
        "ralmspec": [
            "--sizes",
            "1000,4000,16000",
            "--knn-sizes",
            "1000,4000",
            "--questions",
            "8",
            "--repeats",
            "2",
            "--max-new-tokens",
            "96",
        ],
        "knnlm": ["--questions", "8", "--repeats", "2"],
        "specbench": ["--profile", "full", "--name", "specbench"],
        "batch": [],
        "vllm": [],
    },
}

PUBLISHED = """| system | published speed-up over plain decoding (GPU, 7-8B targets) | mean accepted tokens/step |
|---|---|---|
| PLD | 2-4x input-grounded (Mistral-7B, A100); 1.56x Spec-Bench | 1.75 |
| REST | 1.62-2.36x (Vicuna MT-Bench, CodeLlama HumanEval, A6000) | - |
| SAM-Decoding | 1.84x alone; 2.58x with EAGLE-2 (Spec-Bench, Vicuna-7B) | 2.30; 4.62 |
| EAGLE-2 | 2.38x (same setup) | 4.36 |
| SuffixDecoding | up to 5.3x agentic; HumanEval 77 -> 148 tok/s (vLLM, Llama-3.1-8B) | - |
| RASD | about +15 % over EAGLE-2 on DocQA, Summary, Code, In-Domain QA | - |
| RaLMSpec | exact dense 1.75-2.39x, HNSW 1.04-1.39x, BM25 1.31-1.77x (A10, 21M passages) | - |
"""


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS_DIR / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _env_line(payload: dict[str, Any]) -> str:
    env = payload["environment"]
    return (
        f"*{env['cpu']}, {env['cores']} cores, torch {env.get('torch')}, transformers "
        f"{env.get('transformers')}, rasd {env['rasd']} ({env['git_commit']}), {env.get('time', '')}*"
    )


def _produced_by(payload: dict[str, Any]) -> str:
    command = payload.get("command")
    return (
        f"Produced by `{command}`.\n"
        if command
        else "Produced by an earlier run that did not record its command.\n"
    )


def _fmt_rows(rows: list[dict[str, Any]], columns: list[str]) -> str:
    return markdown_table(rows, columns)


def _exact_bf16_section(payload: dict[str, Any] | None) -> list[str]:
    """bench_exact_bf16: the target's verification forward and greedy generation with exact bf16 weights."""
    if not payload:
        return []
    return [
        f"## Exact bf16 weights for the target ({payload['n']} prompt(s) per family, "
        f"{payload['max_new_tokens']} new tokens, greedy)\n",
        _produced_by(payload),
        "A bf16 checkpoint loaded in fp32 (here the 1.5B target rounded to bf16, since the packaged one comes "
        f"from a 4-bit GGUF): the fast path gave {payload['exact_layers']} linear layers exact bf16 copies, "
        "which the kernel widens to fp32 in registers (bit-identical products, half the bytes). Target "
        f"forward after a {payload['context']}-token context, median of 3 interleaved rounds:\n",
        markdown_table(payload["curves"]),
        "\nGeneration over code, chat and summary prompts, contenders rotated per prompt, ratios over HF "
        "`generate` on the same model (`decode phase` leaves out the time to the first new token on both "
        "sides); `_fp32` contenders run the target on the fp32 kernel (`FastPathConfig(exact_bf16=False)`), "
        "`_bf16` on the exact bf16 copies; `rasd_*` drafts with the 0.5B (int8), prompt lookup and Token "
        "Recycling.\n",
        markdown_table(payload["rows"]),
        f"\n{_env_line(payload)}\n\n![exact bf16](results/exact_bf16.png)\n",
    ]


def _e2e_columns(rows: list[dict[str, Any]]) -> list[str]:
    """bench_e2e's columns, less those no row has a value for (``vs plain_fast`` without that contender)."""
    from benchmarks.bench_e2e import COLUMNS

    return [c for c in COLUMNS if any(r.get(c) not in (None, "") for r in rows)]


def report() -> Path:
    parts = [
        "# rasd benchmark results\n",
        "Generated by `python -m benchmarks report` from the JSON files in `benchmarks/results/` "
        "(`python -m benchmarks run --profile quick|full` reruns everything first). All ratios compare "
        "contenders run interleaved in one process on the same machine; absolute seconds are not comparable "
        "across runs. CPU figures, except those of the GPU section.\n",
    ]
    e2e = _load("e2e")
    if e2e:
        parts.append(
            f"## End to end: speculative generation ({e2e['profile']} profile, {e2e['n']} prompt(s) per family, "
            f"{e2e['max_new_tokens']} new tokens, {e2e['split']} split, greedy)\n"
        )
        parts.append(_produced_by(e2e))
        parts.append(
            "Target Qwen2.5-Coder-1.5B, draft Qwen2.5-Coder-0.5B, fp32 on CPU; corpus datastore = stdlib code "
            "+ Python docs + ShareGPT (first 4,000 conversations). `speed-up` is over HF `generate` in the same "
            "run (total seconds over the family's prompts; `per-prompt` columns give the spread of the paired "
            "per-prompt ratios); `vs plain_fast` is over rasd's own plain decoding on its fast path (what speculation alone "
            "buys); `identical` counts outputs token-identical to HF greedy.\n"
        )
        parts.append(_fmt_rows(e2e["rows"], _e2e_columns(e2e["rows"])))
        parts.append(
            f"\n{_env_line(e2e)}\n\n![speed-up per family](results/e2e.png)\n\n"
            "![accepted length](results/e2e_accepted.png)\n"
        )
    native = _load("e2e_rest_native")
    if native and not (e2e and "rest_native" in e2e["contenders"]):
        # Only until the main e2e run includes rest_native (a default contender since it was added).
        parts.append("## REST's own retrieval engine vs ours (same corpus, planner and verifier)\n")
        parts.append(_produced_by(native))
        parts.append(
            "`rest_native` drafts with REST's Rust `draftretriever` (PyPI 0.1.0, REST's code packaged), `rest` "
            "with rasd's C++ suffix automaton, over the same tokens; rasd's planner and verifier serve both. "
            "A separate run from the table above (the contender was added after it): compare ratios within "
            "this table only. ArcticInference's suffix cache is not compared: its 0.3.0 release is an sdist "
            "that builds against torch >= 2.10 and CUDA custom ops, and the 0.0.4 wheel has no suffix "
            "decoding.\n"
        )
        parts.append(_fmt_rows(native["rows"], _e2e_columns(native["rows"])))
        parts.append(f"\n{_env_line(native)}\n")
    # The issue's quick profile on a Xeon (AVX-512/AMX), then the earlier EPYC run; the published leaderboard
    # follows the last table shown.
    # The issue's own quick profile on an AVX-512 EPYC (Zen 4) comes first when present.
    zen4, xeon, epyc = _load("specbench_zen4"), _load("specbench_xeon"), _load("specbench")
    parts.extend(_specbench_section(zen4, "specbench_zen4", published=False))
    parts.extend(_specbench_section(xeon, "specbench_xeon", published=epyc is None))
    parts.extend(_specbench_section(epyc, "specbench", published=True))
    verify = _load("verify")
    if verify:
        parts.append(f"## Verification cost vs tree size (context {verify['context']}, fp32, CPU)\n")
        parts.append(_produced_by(verify))
        parts.append(
            "T(n): one target forward over n tokens after the context. Stock = unmodified transformers; fast = "
            "rasd's native small-batch matrix path (same tokens out).\n"
        )
        cols = ["model", "n", "stock s", "fast s", "stock T(n)/T(1)", "fast T(n)/T(1)", "fast-path speed-up"]
        parts.append(_fmt_rows(verify["rows"], cols))
        parts.append("\nOne 1536 -> 8960 linear layer:\n\n" + markdown_table(verify["linear_1536x8960"]))
        parts.append(f"\n{_env_line(verify)}\n\n![verification cost](results/verify.png)\n")
    parts.extend(_exact_bf16_section(_load("exact_bf16")))
    ds = _load("datastore")
    if ds:
        parts.append("## Datastore\n")
        parts.append(_produced_by(ds))
        parts.append(
            f"Stdlib code with the {ds.get('tokenizer')} tokenizer. Query = 32 tokens of held-out code; `accepted "
            "vs truth` = tokens of the true next 16 the 64-node tree predicts; `numpy scan` is the same "
            "longest-suffix match by a vectorised scan (the native result is checked equal). REST's "
            "`draftretriever` and `arctic-inference` are sdist-only on PyPI (Rust / CUDA toolchains) and were not "
            "run side by side.\n"
        )
        parts.append(_fmt_rows(ds["rows"], list(ds["rows"][0])))
        parts.append(f"\n{_env_line(ds)}\n")
    first = _load("first_call")
    if first:
        parts.append(
            f"## First call on a machine that never measured the model ({first['max_new_tokens']} new tokens)\n"
        )
        parts.append(_produced_by(first))
        parts.append(
            "rasd measures a model's forward paths once per machine (`$RASD_CACHE/costmodel`; `rasd calibrate` "
            "does it ahead of time). Here that cache starts empty for every prompt and nothing is prepared in "
            "memory, so `rasd first` includes building the generator, preparing the fast-path weights and the "
            "quick calibration of the 1.5B target and the 0.5B draft; `rasd warm` is the same call again. Target "
            "and draft as in the end-to-end table, stdlib datastore.\n"
        )
        parts.append(_fmt_rows(first["rows"], list(first["rows"][0])))
        parts.append(f"\n{_env_line(first)}\n")
    ralm = _load("ralmspec")
    parts.extend(_ralmspec_section(ralm, "RaLMSpec", "ralmspec"))
    parts.extend(
        _ralmspec_section(_load("ralmspec_full"), "RaLMSpec over every packaged passage", "ralmspec_full")
    )
    # The retrievers whose +async lost at 44k before OS³ timed the overlapped rounds, re-run after it.
    parts.extend(
        _ralmspec_section(
            _load("ralmspec_full_async"),
            "RaLMSpec over every packaged passage, +async re-measured",
            "ralmspec_full_async",
        )
    )
    parts.extend(_knnlm_section(_load("knnlm")))
    # One run per kind of CPU (the environment records only "AMD EPYC" for both EPYCs).
    for name, isa in (("batch_zen4", "AVX-512"), ("batch", "AVX2"), ("batch_xeon", "AVX-512/AMX")):
        parts.extend(_batch_section(_load(name), name, isa))
    parts.extend(_vllm_section(_load("vllm")))
    gpu = _load("gpu")
    parts.append(
        gpu_report.markdown(gpu)
        if gpu
        else "## GPU\n\nNo GPU run yet: `bash scripts/gpu-check.sh` on a CUDA machine writes "
        "`benchmarks/results/gpu.json` (see the README's GPU check).\n"
    )
    parts.append("## Published numbers, and where we stand\n")
    parts.append(PUBLISHED)
    parts.append(_standing(e2e, ralm))
    REPORT.write_text("\n".join(parts) + "\n")
    return REPORT


def _ralmspec_section(ralm: dict[str, Any] | None, title: str, name: str) -> list[str]:
    if not ralm:
        return []
    parts = [
        f"## {title} ({ralm['model']}, {ralm['questions']} questions x {ralm.get('repeats', 1)} round(s), "
        f"{ralm['max_new_tokens']} new tokens)\n",
        _produced_by(ralm),
        "Speed-up over the iterative RaLM baseline in the same run (total seconds; `per-run` columns give "
        "the spread of the paired ratios, same question and round) and over the KV-reusing baseline; "
        "`retrieval share` is the baseline's fraction of time spent in the knowledge base (query embedding "
        "included: every run embeds its own queries), which bounds what document speculation can save; "
        "`index ms` is one top-20 index search with the query already embedded (what grows with the corpus), "
        "`kb query ms` the baseline's mean latency of one whole knowledge-base call (retriever `knnlm`: KNN-LM "
        "over the LM's own hidden states, one query per token, `kb entries` = datastore entries).\n",
    ]
    cols = [
        "passages",
        "retriever",
        "kb entries",
        "index ms",
        "kb query ms (baseline)",
        "contender",
        "speed-up",
        "per-run median",
        "per-run min",
        "per-run max",
        "vs baseline_kv",
        "hit rate",
        "mean stride",
        "kb calls",
        "retrieval share (baseline)",
        "Amdahl bound",
        "identical",
    ]
    cols = [c for c in cols if c in ralm["rows"][0]]
    parts.append(_fmt_rows(ralm["rows"], cols))
    parts.append(f"\n{_env_line(ralm)}\n\n![{title} speed-up vs corpus size](results/{name}.png)\n")
    return parts


def _knnlm_section(
    run: dict[str, Any] | None,
    title: str = "Speculative KNN-LM where retrieval dominates",
    name: str = "knnlm",
) -> list[str]:
    if not run:
        return []
    gb = run["store_bytes"] / 1e9
    built = f"built in {run['build_s'] / 60:.0f} min in that run" if run.get("build_s") else "cached"
    return [
        f"## {title} ({run['model']}, up to {max(run['entries']):,} entries, "
        f"{run['questions']} questions x {run['repeats']} round(s), {run['max_new_tokens']} new tokens)\n",
        _produced_by(run),
        f"Datastore: {max(run['entries']):,} entries of 576-dim float32 hidden states, {gb:.1f} GB on disk, "
        f"memory-mapped ({built}; a one-time cost); smaller sizes are its prefixes. `speed-up` is over the "
        "KNN-LM baseline on the same index (`vs`); `r` is that baseline's retrieval share and `Amdahl bound` "
        "= 1 / (1 - r) the most any scheme that only hides retrieval can reach; `of bound` = speed-up / bound; "
        "`plain steps` = share of tokens OS³ decoded without speculating. `identical` is against "
        "`baseline_faiss`.\n",
        *_index_builds(run),
        _fmt_rows(run["rows"], list(run["rows"][0])),
        f"\n{_env_line(run)}\n\n![{title} vs datastore size](results/{name}.png)\n",
    ]


def _index_builds(run: dict[str, Any]) -> list[str]:
    """One line with the seconds each index took to build at the largest size (one-time, per process)."""
    builds = (run.get("index_build_s") or {}).get(str(max(run["entries"])))
    if not builds:
        return []
    first_pass = (run.get("exact_first_pass") or {}).get(str(max(run["entries"])))
    chosen = (
        f" The exact index's first pass: {first_pass} (measured at its construction)." if first_pass else ""
    )
    return [
        f"Index builds at {max(run['entries']):,} entries (one-time, paid by every process that opens the "
        "store; not in the timings): "
        + ", ".join(f"{k} {v:.1f} s" for k, v in builds.items())
        + "."
        + chosen
        + "\n"
    ]


def _batch_section(batch: dict[str, Any] | None, name: str, isa: str) -> list[str]:
    if not batch:
        return []
    from benchmarks.bench_batch import COLUMNS

    cpu = batch.get("environment", {}).get("cpu", "unknown CPU")
    parts = [
        f"## Batched generation ({cpu}, {isa}, {batch['model']}, {batch['max_new_tokens']} new tokens, greedy, "
        "held-out prompts)\n",
        _produced_by(batch),
        "Throughput = new tokens of all rows / wall seconds of the whole batch; `decode` leaves out the "
        "prefill (identical work on every side). `hf_batched` is HF `generate` on the left-padded batch, "
        "`rows` rasd's loop one row after another, `batch` every row's tree in one target forward per step "
        "(prompt + corpus lookup + recycling; `_draft`: with the 0.5B draft per row). `fed split` is the mean "
        "number of tree tokens the planner gave each row per step.\n",
        _fmt_rows(batch["rows"], [c for c in COLUMNS if any(c in r for r in batch["rows"])]),
    ]
    goals = batch.get("goals") or []
    if goals:
        mark = {True: "met", False: "**not met**", None: "not measured"}
        parts.append("\n**Issue 23's goals on this run**\n")
        parts.append("\n".join(f"- {g['goal']}: {mark[g['met']]} ({g['detail']})" for g in goals) + "\n")
    parts.append(f"\n{_env_line(batch)}\n\n![batched throughput](results/{name}.png)\n")
    return parts


def _vllm_section(run: dict[str, Any] | None) -> list[str]:
    if not run:
        return []
    from benchmarks.bench_vllm import COLUMNS

    return [
        f"## rasd as a vLLM proposer (vLLM {run['vllm']} CPU build, {run['max_new_tokens']} new tokens, "
        f"k = {run['k']}, {run['dtype']})\n",
        _produced_by(run),
        "Qwen2.5-Coder-0.5B in vLLM's engine (eager), greedy: no speculation, vLLM's `ngram` proposer and "
        "`rasd.integrations.vllm.RasdProposer` (corpus datastore + the request's own text), engines side by "
        "side, rounds in rotated order. `speed-up` is over no speculation; `identical` against the "
        "no-speculation engine. The acceptance columns come from vLLM's spec-decode counters, whose registry "
        "is process-wide: with three engines in one process they are not attributed reliably (ngram reads 0 "
        "drafts although it speculates, as tests/test_vllm.py shows with one engine at a time); read them as "
        "indicative only.\n",
        _fmt_rows(run["rows"], [c for c in COLUMNS if any(c in r for r in run["rows"])]),
        f"\n{_env_line(run)}\n",
    ]


def _specbench_section(sb: dict[str, Any] | None, name: str, *, published: bool) -> list[str]:
    """Spec-Bench: our CPU table in Spec-Bench's layout (six columns + overall), the issue's goals, and (with
    ``published``) the published GPU leaderboard quoted beside it (never in the same table). ``name``: the
    results file's stem, which names the chart."""
    if not sb:
        return []
    from benchmarks.bench_specbench import COLUMN_TITLES, pivot
    from benchmarks.bench_specbench import goals as issue_goals

    rows = sb["rows"]
    parts = [
        f"## Spec-Bench on {sb['environment']['cpu']} ({sb['environment']['cores']} cores; {sb['profile']} "
        f"profile: {sb['n']} question(s) per column, {sb['max_new_tokens']} new tokens, greedy)\n",
        _produced_by(sb),
        "Spec-Bench's questions (Xia et al., 2024: MT-Bench both turns, WMT14 DE-EN, CNN/DM, Natural Questions, "
        "GSM8K, NQ with retrieved passages) with the Qwen2.5-Coder-1.5B-Instruct chat template; target 1.5B, "
        "draft 0.5B, fp32 on this CPU. Questions: "
        + "; ".join(f"{COLUMN_TITLES[c]} {', '.join(map(str, ids))}" for c, ids in sb["questions"].items())
        + f" ({sb['selection']}). The second MT-Bench turn follows HF `generate`'s own first answer and every "
        "contender gets that same prompt; both turns are timed. Ratios are paired per question with HF "
        "`generate` run in the same process (order rotated every turn): `end to end` = total seconds, "
        "`decode phase` = total minus time to first token (TTFT) on both sides. TTFT is the first new tokens "
        "reaching an HF streamer passed to every contender: for HF `generate` the prefill; for the "
        "speculative contenders the prefill (the draft's too) plus the first drafting and verification step. "
        "`overall` = mean of the six columns (each weighs the same); the slowest-question row is the minimum "
        f"over every question. Corpus of `rest`, `rest_native` and `rasd`: {'+'.join(sb['corpus'])} "
        f"({'all' if sb['corpus_limit'] is None else sb['corpus_limit']} conversations).\n",
    ]
    sessions = [(run, sess) for run in sb.get("runs", []) for sess in run["sessions"]]
    if len(sessions) > 1:  # merged or resumed: say which records came from which command and commit
        parts.append(
            "Assembled from "
            + "; ".join(
                f"run {run['id']} ({', '.join(run['contenders'])}): `{sess['command']}` at {sess['git_commit']}"
                for run, sess in sessions
            )
            + ". Each contender is paired with the `hf_plain` of its own run.\n"
        )
    if sb.get("skipped"):
        parts.append("Not run: " + "; ".join(f"`{k}`: {v}" for k, v in sb["skipped"].items()) + ".\n")
    tables = [
        ("Decode-phase speed-up over HF `generate`", "decode speed-up", lambda v: f"{v:.2f}x"),
        ("End-to-end speed-up over HF `generate`", "speed-up", lambda v: f"{v:.2f}x"),
        ("Slowest single question, end to end", "per-question min", lambda v: f"{v:.2f}x"),
        ("Mean accepted tokens per target forward", "accepted/forward", lambda v: f"{v:.2f}"),
        (
            "Prefill share: TTFT / total time (the `hf_plain` row is the baseline's)",
            "prefill share",
            lambda v: f"{v:.0%}",
        ),
        ("Token-identical to HF greedy (turns)", "identical", str),
    ]
    for title, metric, fmt in tables:
        parts.append(f"**{title}**\n")
        parts.append(markdown_table(pivot(rows, metric, fmt)))
    goals = issue_goals(rows) if rows else []  # from the rows, as the current definition of each goal says
    if goals:
        parts.append("**Issue 21's goals on this run**\n")
        mark = {True: "met", False: "**not met**", None: "not measured"}
        parts.append("\n".join(f"- {g['goal']}: {mark[g['met']]} ({g['detail']})" for g in goals) + "\n")
    loads = sorted(r["loadavg"] for r in sb["records"] if "loadavg" in r)
    if loads:
        parts.append(
            f"1-minute load average when each generation started (the machine has {sb['environment']['cores']} "
            f"cores; the benchmark's own threads count in it, so about 2 means nothing else ran): median "
            f"{loads[len(loads) // 2]:.1f}, range {loads[0]:.1f}-{loads[-1]:.1f}.\n"
        )
    parts.append(f"{_env_line(sb)}\n\n![Spec-Bench speed-ups per column](results/{name}.png)\n")
    for table in sb.get("published", []) if published else []:
        if not table["model"].startswith("Vicuna-7B"):
            continue
        parts.append(
            f"**Published Spec-Bench leaderboard: {table['model']}, NVIDIA {table['device']} GPU** (other "
            "hardware and models: fp16 Vicuna on a GPU, batch 1, end-to-end speed-up over that GPU's own "
            "autoregressive decoding; quoted as published in Spec-Bench's Leaderboard.md, not comparable cell "
            "by cell with the CPU tables above)\n"
        )
        cols = ["system", *sb["columns"], "overall", "accepted"]
        heads = {"system": "system", "accepted": "#mean accepted tokens"} | COLUMN_TITLES
        parts.append(markdown_table([{heads[c]: r.get(c, "") for c in cols} for r in table["rows"]]))
    return parts


def _standing(e2e: dict[str, Any] | None, ralm: dict[str, Any] | None) -> str:
    lines = [
        "\nThe published figures come from 7-8B targets on datacenter GPUs, where verifying 64 tokens costs "
        "about one decode step and the draft is ~50x cheaper than the target. Here the target is 1.5B on "
        "2 CPU cores: a 0.5B draft costs a third of a target step and verification grows with tree size, "
        "so the attainable speed-up is lower and trees must be small."
    ]
    if e2e:
        mean = {r["contender"]: r for r in e2e["rows"] if r["family"] == "mean"}
        if "rasd" in mean:
            lines.append(
                f"On this machine RASD averages {mean['rasd']['speed-up']:.2f}x over HF `generate` "
                f"(mean accepted length {mean['rasd']['accepted length']:.2f})"
                + (
                    f", against {mean['hf_assisted']['speed-up']:.2f}x for HF assisted generation"
                    if "hf_assisted" in mean
                    else ""
                )
                + (f" and {mean['hf_pld']['speed-up']:.2f}x for HF prompt lookup" if "hf_pld" in mean else "")
                + "; part of the gain is rasd's CPU fast path, which `vs plain_fast` separates out."
            )
        if "rasd" in mean and "rasd_overlap" in mean:
            gain = mean["rasd_overlap"]["tokens/s"] / mean["rasd"]["tokens/s"]
            runs = [r["stats"] for r in e2e.get("records", []) if r["contender"] == "rasd" and r["stats"]]
            share = sum(s["time_retrieval"] for s in runs) / max(sum(s["time_total"] for s in runs), 1e-9)
            lines.append(
                f"Overlapping retrieval with the draft's forward (`rasd_overlap`) runs at {gain:.2f}x the rate of "
                f"sequential RASD; retrieval is {share:.2%} of sequential RASD's time here, which bounds what "
                "overlap can hide."
            )
    if ralm:
        best = {}
        kv: dict[str, Any] = {}
        for r in ralm["rows"]:
            if r["contender"] == "+async":
                best[r["retriever"]] = r
            if r["contender"] == "all_kv":
                kv[r["retriever"]] = r
        if best:
            lines.append(
                "RaLMSpec at the largest corpus measured: "
                + ", ".join(
                    f"{k} {v['speed-up']:.2f}x (retrieval share {v['retrieval share (baseline)']:.1%})"
                    for k, v in best.items()
                )
                + ". With a 135M LM on CPU and a corpus of thousands (not 21 million) passages, retrieval is a "
                "small share of the baseline's time, so speculation has little to save; the paper's ratios need "
                "retrieval-dominated settings (large corpora, fast GPU LMs)."
                + (
                    " Adding the KV-cache reuse we go past the paper with (`all_kv`: every extra, passage "
                    "prefix not recomputed while the passage is unchanged), against the paper's baseline: "
                    + ", ".join(f"{k} {v['speed-up']:.2f}x" for k, v in kv.items())
                    + "; most of that is the KV reuse, which `baseline_kv` has too."
                    if kv
                    else ""
                )
            )
    return "\n\n".join(lines) + "\n"


def run(profile: str, only: list[str] | None) -> None:
    import importlib

    for name, args in PROFILES[profile].items():
        if only and name not in only:
            continue
        print(f"== bench_{name} {' '.join(args)}", flush=True)
        importlib.import_module(f"benchmarks.bench_{name}").main(args)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run the benchmarks of a profile, then write RESULTS.md")
    p.add_argument("--profile", choices=PROFILES, default="quick")
    p.add_argument("--only", default=None, help="comma-separated subset: verify,datastore,e2e,ralmspec,knnlm")
    sub.add_parser("report", help="rebuild RESULTS.md from benchmarks/results/*.json")
    args = parser.parse_args(argv)
    if args.cmd == "run":
        run(args.profile, args.only.split(",") if args.only else None)
    print(f"wrote {report()}")


if __name__ == "__main__":
    main()
