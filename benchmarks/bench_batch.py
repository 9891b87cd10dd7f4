"""Batched speculative generation: throughput over a batch of B prompts, B = 1, 2, 4, 8.

    python -m benchmarks.bench_batch                         # Qwen2.5-Coder-1.5B, 64 new tokens, B = 1,2,4,8
    python -m benchmarks.bench_batch --batches 4 --max-new-tokens 48 --repeats 1

Contenders (greedy; the same left-padded [B, L] batch for all):

===========  ===========================================================================================
hf_batched   ``model.generate(ids, attention_mask=...)`` on the whole batch (stock transformers, no
             speculation): the baseline of every ratio
rows         rasd's row-by-row loop (``SpeculativeGenerator.generate(..., batch=False)``): prompt lookup +
             corpus lookup + Token Recycling, one row after another
batch        rasd's batched loop (:mod:`rasd.batch`): the same drafters, one per row, every row's tree in
             one target forward per step, the tree sizes chosen together by the planner
rows_draft   ``rows`` + the 0.5B draft model (RASD row by row: what the issue measured today)
batch_draft  ``batch`` + a draft model per row (B draft forwards per expansion step)
===========  ===========================================================================================

The draft contenders run only at the batch sizes of ``--draft-batches`` (their draft prefills and forwards
make them the slowest). Prompts: the held-out test split of :mod:`rasd.tasks`, families interleaved
(code, chat, code, chat, ...), batch B = the first B. Every contender's generator is built afresh for each
run (planner and recycling table start cold: repeated runs over the same prompts would otherwise replay
what they learned). Per batch size and round, the contenders run in a rotated order. Every row of every
contender is checked token-identical to HF ``generate`` on that row alone (computed once per prompt).

Throughput = new tokens of all rows (up to and including EOS) / wall seconds. ``decode`` excludes the
prefill (HF: the time to the first new token, from a streamer; rasd: the prefill it reports), which is
identical work on both sides and dominates short generations on this CPU.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from typing import Any

import torch

from benchmarks.bench_e2e import CORPUS, CORPUS_LIMIT
from benchmarks.bench_specbench import FirstTokenTimer
from benchmarks.harness import RESULTS_DIR, command_line, label_axes, save_figure, write_results
from rasd import models, tasks
from rasd.datastore import Datastore, ensure_datastore
from rasd.generate import SpeculativeGenerator

CONTENDERS = ("hf_batched", "rows", "batch", "rows_draft", "batch_draft")
DRAFTED = ("rows_draft", "batch_draft")
COLUMNS = (
    "B",
    "contender",
    "tokens/s",
    "decode tokens/s",
    "vs hf_batched",
    "vs rows",
    "vs rows_draft",
    "decode vs hf_batched",
    "decode vs rows",
    "tokens/row-step",
    "fed/row",
    "width",
    "padding",
    "fed split",
    "identical",
)
# Issue 23's goals at B = 4: batched throughput over rasd's own row-by-row loop and over HF batched generate.
GOAL_B, GOAL_VS_ROWS, GOAL_VS_HF = 4, 1.5, 2.5


def batch_prompts(tokenizer: Any, families: list[str], n: int) -> list[tuple[str, list[int]]]:
    """The first ``n`` held-out prompts, families interleaved: (prompt id, token ids)."""
    per_family = [tasks.prompts(f, "test", n) for f in families]
    out = [p for group in zip(*per_family, strict=True) for p in group][:n]
    return [(p.id, p.render(tokenizer)) for p in out]


def left_padded(prompts: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, L] ids and attention mask, left padding (as HF users pass a batch to ``generate``)."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def _cut(tokens: list[int], eos: set[int]) -> list[int]:
    """New tokens up to and including the first EOS (HF pads after it)."""
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def run_hf(target, ids, mask, max_new: int, pad: int, eos: set[int]) -> dict[str, Any]:
    timer = FirstTokenTimer()
    start = time.perf_counter()
    with torch.inference_mode():
        out = target.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=max_new,
            do_sample=False,
            pad_token_id=pad,
            streamer=timer,
        )
    seconds = time.perf_counter() - start
    rows = [_cut(out[b, ids.shape[1] :].tolist(), eos) for b in range(ids.shape[0])]
    return {"rows": rows, "seconds": seconds, "prefill": timer.first - start, "stats": None}


def run_rasd(
    gen: SpeculativeGenerator, ids, mask, max_new: int, batch: bool, eos: set[int]
) -> dict[str, Any]:
    start = time.perf_counter()
    res = gen.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False, batch=batch)
    seconds = time.perf_counter() - start
    rows = [_cut(res.sequences[b, ids.shape[1] :].tolist(), eos) for b in range(ids.shape[0])]
    stats = res.stats.to_dict() | {"tokens_per_step": list(res.stats.tokens_per_step)}
    if batch:
        stats |= {
            "fed_tokens": [list(f) for f in res.stats.fed_tokens],
            "widths": list(res.stats.widths),
            "batch_rows": [list(r) for r in res.stats.batch_rows],
        }
    else:  # row by row: one row per forward, root + its nodes fed
        stats |= {"fed_tokens": [[n + 1] for n in res.stats.tree_sizes]}
    return {"rows": rows, "seconds": seconds, "prefill": res.stats.time_prefill, "stats": stats}


def run(args: argparse.Namespace) -> dict[str, Any]:
    batches = [int(b) for b in args.batches.split(",")]
    draft_batches = {int(b) for b in args.draft_batches.split(",") if b}
    names = [c for c in CONTENDERS if c in args.contenders.split(",")]
    if "hf_batched" not in names:
        raise SystemExit("hf_batched is the baseline of every ratio: keep it among --contenders")
    target, tok = models.load_model(args.model)
    draft = models.load_model(args.draft)[0] if any(n in DRAFTED for n in names) else None
    corpus = [c for c in args.corpus.split(",") if c]
    store = (
        Datastore.load(ensure_datastore(args.model, corpus, limit=CORPUS_LIMIT), tokenizer=tok)
        if corpus
        else None
    )
    eos_ids = target.generation_config.eos_token_id
    eos = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))
    pad = tok.pad_token_id if tok.pad_token_id is not None else min(eos)
    prompts = batch_prompts(tok, args.families.split(","), max(batches))

    def runner(name: str):
        if name == "hf_batched":
            return lambda ids, mask, n: run_hf(target, ids, mask, n, pad, eos)
        drafted = {"draft": draft} if name in DRAFTED else {}

        def go(ids, mask, n):
            gen = SpeculativeGenerator(
                target, datastore=store, prompt_lookup=True, recycling=True, tokenizer=tok, **drafted
            )
            return run_rasd(gen, ids, mask, n, name.startswith("batch"), eos)

        return go

    runners = {name: runner(name) for name in names}
    # Warm-up on two dev prompts: kernel preparation, cost profiles, first-call allocations.
    warm = [p.render(tok)[:48] for p in tasks.prompts("code", "dev", 2)]
    for name in names:
        runners[name](*left_padded(warm, pad), 8)

    print("reference: HF generate on each prompt alone", flush=True)
    reference = {}
    for pid, ids in prompts:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = target.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=args.max_new_tokens, do_sample=False
            )
        reference[pid] = _cut(out[0, len(ids) :].tolist(), eos)

    records: list[dict[str, Any]] = []
    rotation = 0
    for b in batches:
        chosen = prompts[:b]
        ids, mask = left_padded([p for _, p in chosen], pad)
        here = [n for n in names if n not in DRAFTED or b in draft_batches]
        for rep in range(args.repeats):
            order = here[rotation % len(here) :] + here[: rotation % len(here)]
            rotation += 1
            for name in order:
                gc.collect()
                result = runners[name](ids, mask, args.max_new_tokens)
                identical = [result["rows"][i] == reference[pid] for i, (pid, _) in enumerate(chosen)]
                tokens = sum(len(r) for r in result["rows"])
                records.append(
                    {
                        "B": b,
                        "repeat": rep,
                        "contender": name,
                        "seconds": result["seconds"],
                        "prefill": result["prefill"],
                        "tokens": tokens,
                        "identical": sum(identical),
                        "rows": b,
                        "stats": result["stats"],
                    }
                )
                print(
                    f"B={b} rep {rep} {name:12} {tokens:4d} tok {result['seconds']:7.2f} s "
                    f"(prefill {result['prefill']:6.2f} s) {tokens / result['seconds']:6.2f} tok/s "
                    f"identical {sum(identical)}/{b}",
                    flush=True,
                )
    return {
        "model": args.model,
        "draft": args.draft if draft is not None else None,
        "batches": batches,
        "draft_batches": sorted(draft_batches),
        "families": args.families.split(","),
        "prompts": [pid for pid, _ in prompts],
        "prompt_tokens": [len(ids) for _, ids in prompts],
        "max_new_tokens": args.max_new_tokens,
        "repeats": args.repeats,
        "contenders": names,
        "corpus": corpus,
        "corpus_limit": CORPUS_LIMIT,
        "records": records,
    }


def fed_split(records: list[dict[str, Any]], b: int) -> list[float] | None:
    """Mean tokens fed per row in the steps where all ``b`` rows were in flight, rows sorted from the one fed
    most to the one fed least in each step: how the planner split a forward among the rows."""
    steps = [
        sorted(fed, reverse=True)
        for r in records
        if r["stats"] and "widths" in r["stats"]
        for fed in r["stats"]["fed_tokens"]
        if len(fed) == b
    ]
    return [statistics.fmean(s[i] for s in steps) for i in range(b)] if steps else None


def _rate(records: list[dict[str, Any]] | None, decode: bool = False) -> float | None:
    """Tokens per second over ``records`` (total tokens / total seconds; ``decode``: prefill excluded)."""
    if not records:
        return None
    seconds = sum(r["seconds"] - (r["prefill"] if decode else 0.0) for r in records)
    return sum(r["tokens"] for r in records) / seconds


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (B, contender): throughput over every round (total tokens / total seconds), its ratio to
    the others in the same rounds, tokens per row-step, and for batched contenders the planner's split."""
    rows = []
    records = payload["records"]
    for b in payload["batches"]:
        mine = {
            name: [r for r in records if r["B"] == b and r["contender"] == name]
            for name in payload["contenders"]
        }
        mine = {k: v for k, v in mine.items() if v}

        for name, recs in mine.items():
            row: dict[str, Any] = {
                "B": b,
                "contender": name,
                "tokens/s": _rate(recs),
                "decode tokens/s": _rate(recs, decode=True),
                "identical": f"{sum(r['identical'] for r in recs)}/{sum(r['rows'] for r in recs)}",
            }
            for other in ("hf_batched", "rows", "rows_draft"):
                if other != name and other in mine:
                    row[f"vs {other}"] = _rate(recs) / _rate(mine[other])
            for other in ("hf_batched", "rows"):
                if other != name and other in mine:
                    row[f"decode vs {other}"] = _rate(recs, True) / _rate(mine[other], True)
            stats = [r["stats"] for r in recs if r["stats"]]
            if stats:
                row["tokens/row-step"] = sum(s["new_tokens"] for s in stats) / sum(
                    len(f) for s in stats for f in s["fed_tokens"]
                )
                fed = [x for s in stats for f in s["fed_tokens"] for x in f]
                row["fed/row"] = statistics.fmean(fed)
            if stats and "widths" in stats[0]:
                widths = [w for s in stats for w in s["widths"]]
                row["width"] = statistics.fmean(widths)
                row["padding"] = statistics.fmean(s["padding_share"] for s in stats)
                split = fed_split(recs, b)
                row["fed split"] = "/".join(f"{x:.1f}" for x in split) if split else ""
            rows.append(row)
    return rows


def goals(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 23's goals at B = 4, judged on this run's rows."""
    at = {r["contender"]: r for r in rows if r["B"] == GOAL_B}
    batch = at.get("batch")
    out = []
    for other, want in (("rows", GOAL_VS_ROWS), ("rows_draft", GOAL_VS_ROWS), ("hf_batched", GOAL_VS_HF)):
        got = batch.get(f"vs {other}") if batch else None
        out.append(
            {
                "goal": f"batch >= {want}x {other} at B = {GOAL_B}",
                "met": None if got is None else got >= want,
                "detail": "not measured" if got is None else f"{got:.2f}x",
            }
        )
    same = [r["identical"].split("/") for r in rows]
    out.append(
        {
            "goal": "every row token-identical to HF generate on that row alone",
            "met": all(a == n for a, n in same),
            "detail": f"{sum(int(a) for a, _ in same)}/{sum(int(n) for _, n in same)} rows",
        }
    )
    return out


def plot(payload: dict[str, Any], rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("tokens/s", "decode tokens/s"), strict=True):
        for contender in payload["contenders"]:
            pts = [(r["B"], r[metric]) for r in rows if r["contender"] == contender]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=contender)
        ax.set_xscale("log", base=2)
        ax.set_xticks(payload["batches"], [str(b) for b in payload["batches"]])
        label_axes(ax, "batch size B", f"{metric} over the batch", metric.replace("tokens/s", "throughput"))
    fig.suptitle(f"{payload['model']}, {payload['max_new_tokens']} new tokens, greedy, held-out prompts")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=models.DEFAULT_TARGET)
    parser.add_argument("--draft", default=models.DEFAULT_DRAFT)
    parser.add_argument("--batches", default="1,2,4,8")
    parser.add_argument("--draft-batches", default="4", help="batch sizes at which the draft contenders run")
    parser.add_argument("--families", default="code,chat")
    parser.add_argument(
        "--corpus", default=",".join(CORPUS), help="packaged corpora of the corpus datastore ('' = none)"
    )
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--name", default="batch")
    parser.add_argument(
        "--resummarize", action="store_true", help="run nothing: rebuild the table of results/NAME.json"
    )
    args = parser.parse_args(argv)
    env = None
    command = command_line("benchmarks.bench_batch", argv)
    if args.resummarize:
        payload = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        env, command = payload.pop("environment"), payload.pop("command", None)
        for key in ("rows", "goals"):
            payload.pop(key, None)
    else:
        torch.manual_seed(0)
        payload = run(args)
    rows = summarize(payload)
    write_results(
        args.name,
        payload | {"rows": rows, "goals": goals(rows)},
        rows,
        columns=COLUMNS,
        title=f"Batched generation ({payload['model']}, {payload['max_new_tokens']} new tokens)",
        command=command,
        env=env,
    )
    plot(payload, rows, args.name)
    print((RESULTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
