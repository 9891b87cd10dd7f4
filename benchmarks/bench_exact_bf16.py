"""Exact bf16 weights for the target: a bf16 checkpoint loaded in fp32, verified at half the weight traffic.

    python -m benchmarks.bench_exact_bf16                          # 1.5B target rounded to bf16, 6 prompts
    python -m benchmarks.bench_exact_bf16 --n 1 --max-new-tokens 32 --repeats 1

Published checkpoints (Qwen2.5 among them) are bf16; on a CPU they are loaded in fp32, where every weight is
still a bf16 value. ``FastPathConfig(exact_bf16=True)`` (the default) then gives the native kernel bf16
copies: it widens them to fp32 in registers and accumulates in the fp32 kernel's order, so every
verification is bit-identical to the fp32 kernel's with half the bytes streamed. The packaged target comes
from a 4-bit GGUF (its fp32 weights are not bf16 values), so this benchmark rounds it to bf16 first: the
model a bf16 checkpoint of it would be. HF ``generate`` runs that same model.

Part 1, verification forwards: T(n) after a 512-token context on stock transformers, the fp32 kernel
(``exact_bf16=False``) and the exact bf16 kernel, interleaved round by round.
Part 2, generation (greedy, contenders rotated per prompt, all checked token-identical to HF ``generate``):

==============  ================================================================================
hf_plain        ``model.generate`` on the bf16-valued fp32 model (the baseline of every ratio)
plain_fp32      rasd's loop, no drafter, target on the fp32 kernel (``exact_bf16=False``)
plain_bf16      the same on the exact bf16 kernel
rasd_fp32       rasd with the 0.5B draft + prompt lookup + Token Recycling, target on the fp32 kernel
rasd_bf16       the same, target on the exact bf16 kernel (the default)
==============  ================================================================================

Each contender's generator keeps its own planner (its own cost curve: the two kernels price trees
differently). ``decode`` = total minus the time to the first new token (an HF streamer), on both sides.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.bench_e2e import hf_runner
from benchmarks.bench_specbench import FirstTokenTimer
from benchmarks.bench_verify import interleaved_curves
from benchmarks.harness import Summary, command_line, label_axes, save_figure, write_results
from rasd import models, tasks
from rasd.fastpath import FastPath, FastPathConfig
from rasd.generate import SpeculativeGenerator

CONTENDERS = ("hf_plain", "plain_fp32", "plain_bf16", "rasd_fp32", "rasd_bf16")
SIZES = (1, 2, 4, 8, 16)
FAMILIES = ("code", "chat", "summary")
FP32 = FastPathConfig(exact_bf16=False)
EXACT = FastPathConfig()


def round_to_bf16(model: torch.nn.Module) -> None:
    """Every parameter to its nearest bf16 value, kept in fp32 (a bf16 checkpoint loaded in fp32)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))


def verify_curves(model: torch.nn.Module, context: int, repeats: int) -> list[dict[str, Any]]:
    paths: dict[str, Any] = {
        "stock": False,
        "fp32 kernel": FastPath.for_model(model, FP32),
        "exact bf16 kernel": FastPath.for_model(model, EXACT),
    }
    times = interleaved_curves(model, paths, SIZES, context, repeats)
    rows = []
    for n in SIZES:
        med = {p: statistics.median(times[p][n]) for p in paths}
        rows.append(
            {
                "n": n,
                "stock ms": 1e3 * med["stock"],
                "fp32 kernel ms": 1e3 * med["fp32 kernel"],
                "exact bf16 ms": 1e3 * med["exact bf16 kernel"],
                "bf16 vs fp32 kernel": med["fp32 kernel"] / med["exact bf16 kernel"],
                "bf16 vs stock": med["stock"] / med["exact bf16 kernel"],
            }
        )
    return rows


def make_runners(target, draft, tokenizer, max_new_tokens: int) -> dict[str, Callable[..., Any]]:
    def ours(config: FastPathConfig, **kw: Any) -> Callable[..., Any]:
        gen = SpeculativeGenerator(target, tokenizer=tokenizer, fast_path=config, **kw)

        def run(ids: list[int], **call: Any) -> tuple[list[int], dict[str, Any]]:
            res = gen.generate(ids, **({"max_new_tokens": max_new_tokens, "do_sample": False} | call))
            return res.sequences[0, len(ids) :].tolist()[: res.stats.new_tokens], res.stats.to_dict()

        return run

    spec = {"draft": draft, "prompt_lookup": True, "recycling": True}
    return {
        "hf_plain": hf_runner(target, max_new_tokens),
        "plain_fp32": ours(FP32, prompt_lookup=False),
        "plain_bf16": ours(EXACT, prompt_lookup=False),
        "rasd_fp32": ours(FP32, **spec),
        "rasd_bf16": ours(EXACT, **spec),
    }


def generation(runners, prompts: list[tuple[str, list[int]]], repeats: int, eos: set[int]) -> list[dict]:
    records = []
    for rnd in range(repeats):
        for i, (pid, ids) in enumerate(prompts):
            names = list(runners)
            k = (rnd * len(prompts) + i) % len(names)
            for name in names[k:] + names[:k]:
                timer = FirstTokenTimer()
                start = time.perf_counter()
                tokens, stats = runners[name](ids, streamer=timer)
                total = time.perf_counter() - start
                cut = next((j + 1 for j, t in enumerate(tokens) if t in eos), len(tokens))
                records.append(
                    {
                        "round": rnd,
                        "prompt": pid,
                        "prompt_tokens": len(ids),
                        "contender": name,
                        "seconds": total,
                        "ttft": (timer.first or start) - start,
                        "tokens": tokens[:cut],
                        "steps": stats["steps"] if stats else len(tokens[:cut]),
                    }
                )
                ttft = records[-1]["ttft"]
                print(f"{pid:>14} r{rnd} {name:<11} {total:6.2f} s  ttft {ttft:5.2f} s", flush=True)
    return records


def summarize(records: list[dict]) -> list[dict[str, Any]]:
    base = {(r["round"], r["prompt"]): r for r in records if r["contender"] == "hf_plain"}
    rows = []
    for name in CONTENDERS:
        mine = [r for r in records if r["contender"] == name]
        if not mine:
            continue
        pairs = [(base[(r["round"], r["prompt"])], r) for r in mine]
        e2e = [b["seconds"] / r["seconds"] for b, r in pairs]
        decode = [(b["seconds"] - b["ttft"]) / (r["seconds"] - r["ttft"]) for b, r in pairs]
        rows.append(
            {
                "contender": name,
                "end to end": sum(b["seconds"] for b, _ in pairs) / sum(r["seconds"] for _, r in pairs),
                "decode phase": sum(b["seconds"] - b["ttft"] for b, _ in pairs)
                / sum(r["seconds"] - r["ttft"] for _, r in pairs),
                "per-prompt e2e min": min(e2e),
                "per-prompt decode min": min(decode),
                "prefill share": statistics.fmean(r["ttft"] / r["seconds"] for r in mine),
                "tokens/step": sum(len(r["tokens"]) for r in mine) / sum(r["steps"] for r in mine),
                "identical": f"{sum(r['tokens'] == b['tokens'] for b, r in pairs)}/{len(pairs)}",
            }
        )
    return rows


def plot(curves: list[dict[str, Any]], rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ns = [c["n"] for c in curves]
    for key, style in (("stock ms", "o--"), ("fp32 kernel ms", "o-"), ("exact bf16 ms", "s-")):
        left.plot(ns, [c[key] for c in curves], style, label=key.replace(" ms", ""))
    left.set_xscale("log", base=2)
    label_axes(left, "tokens verified in one forward (n)", "ms", "Target forward, 1.5B (bf16 values in fp32)")
    names = [r["contender"] for r in rows]
    x = range(len(names))
    right.bar([i - 0.2 for i in x], [r["end to end"] for r in rows], 0.4, label="end to end")
    right.bar([i + 0.2 for i in x], [r["decode phase"] for r in rows], 0.4, label="decode phase")
    right.set_xticks(list(x), names, rotation=20)
    label_axes(right, "", "speed-up over HF generate", "Greedy generation, token-identical")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=2, help="prompts per family (code, chat, summary)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1, help="rounds of generation (curves: 3 rounds)")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--name", default="exact_bf16")
    args = parser.parse_args(argv)
    target, tokenizer = models.load_model(models.DEFAULT_TARGET)
    draft, _ = models.load_model(models.DEFAULT_DRAFT)
    round_to_bf16(target)
    curves = verify_curves(target, args.context, 3)
    gc.collect()
    groups = [tasks.prompts(f, "test", args.n) for f in FAMILIES]
    prompts = [(p.id, p.render(tokenizer)) for group in zip(*groups, strict=True) for p in group]
    runners = make_runners(target, draft, tokenizer, args.max_new_tokens)
    eos = target.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    warm = prompts[-1][1]
    for run in runners.values():  # first calls: plans, calibration, allocations
        run(warm, max_new_tokens=8)
    records = generation(runners, prompts, args.repeats, eos)
    rows = summarize(records)
    fast = FastPath.for_model(target, EXACT)
    payload = {
        "target": models.DEFAULT_TARGET,
        "draft": models.DEFAULT_DRAFT,
        "max_new_tokens": args.max_new_tokens,
        "n": args.n,
        "families": FAMILIES,
        "context": args.context,
        "exact_layers": fast.exact_bf16_layers,
        "curves": curves,
        "rows": rows,
        "records": records,
        "seconds": {
            r["contender"]: Summary.of([x["seconds"] for x in records if x["contender"] == r["contender"]])
            for r in rows
        },
    }
    write_results(
        args.name,
        payload,
        rows,
        title=f"Exact bf16 weights for the target ({args.n} prompt(s) x {len(FAMILIES)} families, "
        f"{args.max_new_tokens} new tokens)",
        command=command_line("benchmarks.bench_exact_bf16", argv),
    )
    plot(curves, rows, args.name)
    for row in curves:
        print(row)
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
