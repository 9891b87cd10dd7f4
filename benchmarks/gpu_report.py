"""Reading the GPU check's JSON (:mod:`benchmarks.gpu_check`): the RESULTS.md section, the console summary,
and the last step of ``scripts/gpu-check.sh`` that adds the CUDA-marked tests' outcome to it. No torch import:
``python -m benchmarks report`` stays light.

    python -m benchmarks.gpu_report markdown DIR/gpu.json     # the section RESULTS.md shows
    python -m benchmarks.gpu_report summary DIR/gpu.json      # a few lines for the console
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.harness import markdown_table


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Replace ``path`` atomically with ``payload`` as indented JSON."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    tmp.replace(path)


def finish(out_dir: Path, junit: Path | None, pytest_rc: int | None, total_seconds: float | None) -> dict:
    """Add the CUDA-marked tests' outcome (pytest's JUnit XML) and the whole script's time to gpu.json."""
    path = out_dir / "gpu.json"
    payload = json.loads(path.read_text())
    if payload.get("status") == "running":
        payload["status"] = "cut short (the measurements were stopped by their timeout or crashed)"
    tests: dict[str, Any] = {"returncode": pytest_rc}
    if junit is not None and junit.exists():
        root = ET.parse(junit).getroot()
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        for key in ("tests", "failures", "errors", "skipped"):
            tests[key] = sum(int(s.get(key, 0)) for s in suites)
        tests["seconds"] = sum(float(s.get("time", 0)) for s in suites)
        tests["failed"] = [
            f"{case.get('classname')}::{case.get('name')}"
            for case in root.iter("testcase")
            if case.find("failure") is not None or case.find("error") is not None
        ]
        tests["passed"] = tests["tests"] - tests["failures"] - tests["errors"] - tests["skipped"]
    else:
        tests["error"] = "no JUnit report (pytest did not run or was killed by its timeout)"
    payload["cuda_tests"] = tests
    if total_seconds is not None:
        payload["script_seconds"] = total_seconds
    write_json(path, payload)
    return payload


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    return markdown_table(list(rows), columns)


def markdown(payload: dict[str, Any]) -> str:
    """The GPU section of RESULTS.md from a gpu.json payload (a GPU run, or the CPU form, labelled so)."""
    env = payload.get("environment", {})
    on_gpu = payload.get("device") == "cuda"
    machine = (
        f"{env.get('gpu')} ({env.get('gpu_memory_gib')} GiB), CUDA {env.get('cuda')}"
        if on_gpu
        else f"{env.get('cpu')}, {env.get('cores')} cores"
    )
    title = "## GPU" if on_gpu else "## GPU check, CPU form (tiny shapes; not a GPU run)"
    parts = [
        f"{title}\n",
        f"Measured on **{machine}**: torch {env.get('torch')}, transformers {env.get('transformers')}, rasd "
        f"{env.get('rasd')} ({env.get('git_commit') or 'commit not recorded'}), {env.get('time', '')}. "
        f"Produced by `bash scripts/gpu-check.sh` (`{payload.get('command')}`); status "
        f"**{payload.get('status')}**"
        + (f", {payload['script_seconds']:.0f} s in all" if payload.get("script_seconds") else "")
        + ".\n",
        _models_paragraph(payload, on_gpu),
    ]
    parts += _identity_md(payload.get("identity") or {})
    parts += _cost_md(payload.get("cost"), payload.get("shapes", {}).get("large", {}).get("name", "?"))
    parts += _transfers_md(payload.get("transfers"))
    parts += _sampling_md(payload.get("sampling"))
    tests = payload.get("cuda_tests")
    if tests:
        parts.append(
            "CUDA-marked tests (`pytest -m gpu`): "
            + (
                f"{tests.get('passed')} passed, {tests.get('failures', 0) + tests.get('errors', 0)} failed, "
                f"{tests.get('skipped')} skipped in {tests.get('seconds', 0):.0f} s"
                if "tests" in tests
                else tests.get("error", "")
            )
            + (f"; failing: {', '.join(tests['failed'])}" if tests.get("failed") else "")
            + ".\n"
        )
    phases = payload.get("phases", {})
    parts.append(
        "Phases (seconds): "
        + "; ".join(f"{name} {p.get('seconds', 0):.0f} ({p.get('status')})" for name, p in phases.items())
        + ".\n"
    )
    return "\n".join(parts) + "\n"


def _models_paragraph(payload: dict[str, Any], on_gpu: bool) -> str:
    shapes = ", ".join(
        f"{s['name']}: {s['parameters'] / 1e9:.2f} B parameters"
        if s["parameters"] >= 1e8
        else f"{s['name']}: {s['parameters'] / 1e6:.2f} M parameters"
        for s in payload.get("shapes", {}).values()
    )
    if not on_gpu:
        return (
            f"The GPU check's own code on tiny random-weight Qwen2 stand-ins ({shapes}) on the CPU, as CI "
            "runs it: a test that the check works, not figures about a GPU or these shapes.\n"
        )
    return (
        f"Models are random-weight Qwen2 of real shapes ({shapes}) built on the machine: no weights travel "
        "there (64 MiB of files do). Cost depends on the shape, so the verification-cost curve is real. "
        "**Not measurable there: acceptance rates and end-to-end speed-ups** (they need real weights); the "
        "accepted tokens below come from drafts made to hit (oracle trees, the target as its own draft, a "
        "datastore of its own output) so that acceptance and KV compaction run, and say nothing about real "
        "acceptance.\n"
    )


def _identity_md(identity: dict[str, Any]) -> list[str]:
    if not identity:
        return []
    rows = []
    for key, res in identity.items():
        for name, t in res["configs"].items():
            margins = [abs(d["margin"]) for d in t["divergences"] if "margin" in d]
            rows.append(
                {
                    "model/dtype": key,
                    "drafts": name,
                    "prompts": t["prompts"],
                    "identical": t["identical"],
                    "numeric ties": t["ties"],
                    "diverged": t["diverged"],
                    "accepted tokens": t["accepted"],
                    "tokens/step": t["tokens_per_step"],
                    "largest margin at a divergence": max(margins) if margins else None,
                }
            )
    return [
        "### Greedy identity against HF `generate` (same model, same dtype)\n",
        "Prompts of random ids (lengths "
        + ", ".join(
            f"{k}: {min(r['prompt_lengths'])}-{max(r['prompt_lengths'])}"
            for k, r in identity.items()
            if r["prompt_lengths"]
        )
        + "). `numeric ties`: outputs that diverge where HF's own logits for its token and rasd's differ by "
        "less than the dtype's rounding (fp32 1e-3, bf16 0.125, fp16 0.03): two kernels summing in different "
        "orders, not a verification error; `diverged`: anything else. `off` is rasd without speculation, the "
        "control for what the verification path alone changes in half precision.\n",
        _table(rows),
    ]


def _cost_md(cost_result: dict[str, Any] | None, shape: str) -> list[str]:
    if not cost_result or not cost_result.get("contexts"):
        return []
    parts = [
        f"### Verification cost T(n) ({shape}, {cost_result['dtype']})\n",
        "n = tokens fed (the root plus n - 1 tree nodes). `stock`: an unmodified transformers forward of n "
        "new tokens on the KV cache (causal mask); `rasd chain` / `rasd tree`: rasd's verification "
        "(`TargetSession.verify`, 4D tree mask built on the host) of a chain / a random tree. Medians, "
        "synchronised timing.\n",
    ]
    for context, res in cost_result["contexts"].items():
        parts.append(
            f"**Context {context}**: rasd's T(n) stays within 10 % of T(1) up to n = {res['free_up_to']}"
            + (f" and reaches 2x at n = {res['doubles_at']}" if res["doubles_at"] else "")
            + ".\n"
        )
        parts.append(_table(res["rows"]))
        parts.append(
            "Tree size rasd's planner keeps on this curve when offered a chain or a top-4 tree whose nodes "
            "it expects to be accepted with the given probability (an assumption, not a measurement); "
            "`rate vs plain` = expected tokens per second over plain decoding under that assumption:\n"
        )
        parts.append(_table(res["planner"]))
    return parts


def _transfers_md(result: dict[str, Any] | None) -> list[str]:
    if not result or not result.get("configs"):
        return []
    rows, sites = [], []
    for name, row in result["configs"].items():
        per = row.get("per step", {})
        prof = row.get("profiler per step", {})
        rows.append(
            {
                "drafter": name,
                "copies HtoD": per.get("HtoD"),
                "copies DtoH": per.get("DtoH"),
                "syncs": row.get("syncs per step"),
                "profiler memcpy HtoD": prof.get("HtoD"),
                "profiler memcpy DtoH": prof.get("DtoH"),
                "error": row.get("error", ""),
            }
        )
        top = list(row.get("sites", {}).items())[:4]
        if top:
            sites.append(f"- {name}: " + "; ".join(f"{site} ({n:g})" for site, n in top))
    return [
        f"### Host-device traffic per decoding step (context {result['context']}, {result['steps']} steps)\n",
        "`copies`: copies between host and device seen at torch's dispatcher (`.to`, `.cpu`, `.item`, "
        "`.tolist`, `torch.tensor(..., device=)`); `syncs`: operations that block the host (torch's sync "
        "debug mode); `profiler`: memcpy events the CUDA profiler recorded (copies inside kernels too).\n",
        _table(rows),
        *(["Where the copies come from (per step):\n\n" + "\n".join(sites) + "\n"] if sites else []),
    ]


def _sampling_md(result: dict[str, Any] | None) -> list[str]:
    if not result:
        return []
    return [
        f"### Lossless sampling on {result['device']} (chi-square)\n",
        _table(result["checks"], ["check", "trials", "p", "expect", "passed"]),
    ]


def summary(payload: dict[str, Any]) -> str:
    """A few lines for the console: identity counts, T(n)/T(1) at the largest n, sampling and tests."""
    lines = [f"gpu-check ({payload['device']}, {payload['profile']}): {payload['status']}"]
    for key, res in (payload.get("identity") or {}).items():
        cells = ", ".join(
            f"{n} {t['identical']}/{t['prompts']}"
            + (f" ({t['ties']} ties, {t['diverged']} diverged)" if t["ties"] or t["diverged"] else "")
            + f" acc {t['accepted']}"
            for n, t in res["configs"].items()
        )
        lines.append(f"  identity {key}: {cells}")
    for context, res in ((payload.get("cost") or {}).get("contexts") or {}).items():
        last = res["rows"][-1]
        lines.append(
            f"  cost ctx {context}: T({last['n']})/T(1) rasd {last['rasd T(n)/T(1)']:.2f}, stock "
            f"{last['stock T(n)/T(1)']:.2f}; free up to n={res['free_up_to']}"
        )
    for name, row in ((payload.get("transfers") or {}).get("configs") or {}).items():
        lines.append(f"  transfers {name}: {row.get('per step', row.get('error'))}")
    for check in (payload.get("sampling") or {}).get("checks", []):
        lines.append(f"  sampling {check['check']}: p={check['p']:.3g} {'ok' if check['passed'] else 'FAIL'}")
    for name, p in payload.get("phases", {}).items():
        if p["status"] != "ok":
            lines.append(f"  phase {name}: {p['status']} {p.get('error', '')}")
    if payload.get("cuda_tests"):
        lines.append(f"  cuda tests: {payload['cuda_tests']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_report",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser(
        "finish", help="add the CUDA tests' JUnit report and the script's time to DIR/gpu.json"
    )
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--junit", type=Path, default=None)
    f.add_argument("--pytest-rc", type=int, default=None)
    f.add_argument("--total-seconds", type=float, default=None)
    for name, text in (
        ("markdown", "print the RESULTS.md section"),
        ("summary", "print the console summary"),
    ):
        sub.add_parser(name, help=f"{text} of a gpu.json").add_argument("json", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "finish":
        print(summary(finish(args.out, args.junit, args.pytest_rc, args.total_seconds)))
        return 0
    payload = json.loads(args.json.read_text())
    print(markdown(payload) if args.cmd == "markdown" else summary(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
