"""rasd inside vLLM: tokens/s of vLLM's CPU build with no speculation, vLLM's ``ngram`` proposer and rasd's
``RasdProposer`` (corpus datastore + the request's own text), on code and doc-QA prompts at batch 1 and 4.

    python -m benchmarks.bench_vllm                            # re-runs itself in scripts/vllm-env.sh's venv
    bash scripts/vllm-env.sh python -m benchmarks.bench_vllm --families docqa --batches 4

vLLM lives in its own venv (it pins torch and an older transformers), so from rasd's main environment this
script builds/refreshes that venv and runs itself there. The three engines (Qwen2.5-Coder-0.5B from rasd's
converted cache, eager mode, one engine per contender) stay loaded side by side and every measurement
round runs them in rotated order, so machine drift hits all alike; per round each contender generates the
same prompts greedily (batch 1: one request at a time; batch 4: all four submitted together). Outputs
are checked token-identical to the no-speculation engine's, and vLLM's own spec-decode counters give the
acceptance (accepted / proposed draft tokens, and accepted tokens per draft).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_e2e import CORPUS, CORPUS_LIMIT
from benchmarks.harness import Summary, command_line, ratio, write_results

COLUMNS = (
    "family",
    "batch",
    "contender",
    "tokens/s",
    "speed-up",
    "per-round min",
    "per-round max",
    "accepted/proposed",
    "accepted per draft",
    "identical",
)
SPECULATION: dict[str, dict[str, Any] | None] = {
    "vllm": None,
    # vLLM's own prompt lookup: n-grams of 2-4 tokens, as rasd's min_match=2.
    "ngram": {"method": "ngram", "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    "rasd": {"method": "custom_class", "model": "rasd.integrations.vllm.RasdProposer"},
}


def _counts(llm: Any) -> dict[str, int]:
    """vLLM's cumulative spec-decode counters (the Prometheus registry is process-wide: take differences)."""
    from vllm.v1.metrics.reader import Counter

    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0}
    names = {
        "vllm:spec_decode_num_drafts": "drafts",
        "vllm:spec_decode_num_draft_tokens": "draft_tokens",
        "vllm:spec_decode_num_accepted_tokens": "accepted",
    }
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in names:
            out[names[metric.name]] += metric.value
    return out


def _run(llm: Any, prompts: list[list[int]], batch: int, max_new: int) -> tuple[list[list[int]], float]:
    """Greedy outputs of ``prompts`` submitted ``batch`` at a time, and the wall seconds."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_new, ignore_eos=True)
    outs: list[list[int]] = []
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        chunk = [{"prompt_token_ids": p} for p in prompts[i : i + batch]]
        outs += [list(o.outputs[0].token_ids) for o in llm.generate(chunk, params, use_tqdm=False)]
    return outs, time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", default="code,docqa")
    parser.add_argument("--n", type=int, default=4, help="prompts per family (test split)")
    parser.add_argument("--batches", default="1,4")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=6, help="num_speculative_tokens")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--name", default="vllm")
    args = parser.parse_args(argv)
    try:
        import vllm
    except ImportError:
        # From rasd's main environment: the same command inside the vLLM venv.
        root = Path(__file__).resolve().parent.parent
        forwarded = sys.argv[1:] if argv is None else list(argv)
        cmd = ["bash", str(root / "scripts" / "vllm-env.sh"), "python", "-m", "benchmarks.bench_vllm"]
        subprocess.run([*cmd, *forwarded], check=True, cwd=root)
        return
    from vllm import LLM

    from rasd import models, tasks
    from rasd.datastore import ensure_datastore

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    model_dir = str(models.ensure_model(models.DEFAULT_DRAFT))
    tok = models.load_tokenizer(models.DEFAULT_DRAFT)
    corpus = ensure_datastore(models.DEFAULT_TARGET, CORPUS, limit=CORPUS_LIMIT)  # the e2e corpus
    batches = [int(b) for b in args.batches.split(",")]
    families = args.families.split(",")
    prompts = {f: [p.render(tok) for p in tasks.prompts(f, "test", args.n)] for f in families}
    engines: dict[str, Any] = {}
    for name, spec in SPECULATION.items():
        start = time.perf_counter()
        engines[name] = LLM(
            model=model_dir,
            dtype=args.dtype,
            enforce_eager=True,
            max_model_len=4096,
            max_num_seqs=max(batches),
            seed=0,
            disable_log_stats=False,
            speculative_config=None if spec is None else {**spec, "num_speculative_tokens": args.k},
            additional_config={"rasd": {"datastore": str(corpus)}} if name == "rasd" else {},
        )
        print(f"{name}: engine up in {time.perf_counter() - start:.1f} s", flush=True)
        _run(engines[name], prompts[families[0]][:1], 1, 8)  # warm-up: first-call allocations
    records = []
    for family in families:
        for batch in batches:
            names = list(engines)
            for r in range(args.repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    before = _counts(engines[name])
                    outs, seconds = _run(engines[name], prompts[family], batch, args.max_new_tokens)
                    after = _counts(engines[name])
                    records.append(
                        {
                            "family": family,
                            "batch": batch,
                            "round": r,
                            "contender": name,
                            "seconds": seconds,
                            "tokens": sum(len(o) for o in outs),
                            "outputs": outs,
                            **{k: after[k] - before[k] for k in after},
                        }
                    )
                    print({k: v for k, v in records[-1].items() if k != "outputs"}, flush=True)
    rows = _summarize(records)
    write_results(
        args.name,
        {
            "records": records,
            "rows": rows,
            "families": families,
            "n": args.n,
            "batches": batches,
            "max_new_tokens": args.max_new_tokens,
            "k": args.k,
            "dtype": args.dtype,
            "vllm": vllm.__version__,
            "corpus": list(CORPUS),
            "corpus_limit": CORPUS_LIMIT,
        },
        rows,
        columns=COLUMNS,
        title=f"vLLM {vllm.__version__} on CPU: tokens/s with and without speculation",
        command=command_line("benchmarks.bench_vllm", argv),
    )


def _summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (family, batch, contender): median tokens/s over rounds, the speed-up over plain vLLM
    paired per round, acceptance from vLLM's counters, and identity with plain vLLM's outputs."""
    rows = []
    keys = sorted({(r["family"], r["batch"]) for r in records}, key=lambda fb: (fb[0], fb[1]))
    for family, batch in keys:
        group = [r for r in records if (r["family"], r["batch"]) == (family, batch)]
        base = {r["round"]: r for r in group if r["contender"] == "vllm"}
        for name in dict.fromkeys(r["contender"] for r in group):
            mine = [r for r in group if r["contender"] == name]
            speedups = [ratio(base[r["round"]]["seconds"], r["seconds"]) for r in mine]
            proposed = sum(r["draft_tokens"] for r in mine)
            drafts = sum(r["drafts"] for r in mine)
            accepted = sum(r["accepted"] for r in mine)
            same = sum(r["outputs"] == base[r["round"]]["outputs"] for r in mine)
            rows.append(
                {
                    "family": family,
                    "batch": batch,
                    "contender": name,
                    "tokens/s": Summary.of([r["tokens"] / r["seconds"] for r in mine]).median,
                    "speed-up": Summary.of(speedups).median,
                    "per-round min": min(speedups),
                    "per-round max": max(speedups),
                    "accepted/proposed": accepted / proposed if proposed else None,
                    "accepted per draft": accepted / drafts if drafts else None,
                    "identical": f"{same}/{len(mine)}",
                }
            )
    return rows


if __name__ == "__main__":
    main()
