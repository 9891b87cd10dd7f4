"""End to end: every contender on the four task families, side by side in one process.

    python -m benchmarks.bench_e2e --profile quick      # ~1 h: 2 prompts per family, 128 tokens
    python -m benchmarks.bench_e2e --profile full       # the reported numbers: 6 prompts, 128 tokens

Contenders (greedy; all must produce the same tokens as ``hf_plain``, which is checked and recorded):

==============  ===================================================================================
hf_plain        ``model.generate`` (stock transformers: the baseline of every ratio)
hf_assisted     ``model.generate(assistant_model=draft)`` (HF assisted generation)
hf_pld          ``model.generate(prompt_lookup_num_tokens=10)`` (HF prompt lookup decoding)
plain_fast      rasd's loop with no drafter: plain decoding on rasd's CPU fast path
pld             rasd PromptLookup (prompt + output suffix automaton, trees)
rest            rasd CorpusLookup (static datastore only)
rest_native     REST's own ``draftretriever`` (suffix array, Rust) as the drafter, same corpus and verifier;
                only where ``draftretriever`` installs (``pip install draftretriever==0.1.0``), else skipped
draft           rasd DraftModel (dynamic draft trees)
rasd            rasd Fused: prompt + corpus retrieval pruned by and fused with the draft tree
rasd_overlap    rasd Fused with ``overlap=True``: retrieval in a worker thread during the draft's forward
==============  ===================================================================================

Prompts come from :mod:`rasd.tasks` (test split unless ``--split dev``). For each prompt the contenders run
in a rotated order; speed-up is total ``hf_plain`` time over total contender time on the same prompts.
The corpus datastore is the packaged stdlib code + Python docs + ShareGPT (first 4,000 conversations),
built once into ``$RASD_CACHE/datastores``.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks import rest_native
from benchmarks.harness import (
    RESULTS_DIR,
    Summary,
    command_line,
    mean_accepted_length,
    ratio,
    save_figure,
    write_results,
)
from rasd import models, tasks
from rasd.datastore import Datastore, ensure_datastore
from rasd.generate import SpeculativeGenerator

CONTENDERS = (
    "hf_plain",
    "hf_assisted",
    "hf_pld",
    "plain_fast",
    "pld",
    "rest",
    "rest_native",
    "draft",
    "rasd",
    "rasd_overlap",
)
PROFILES = {
    "quick": {"n": 2, "max_new_tokens": 128},
    "full": {"n": 6, "max_new_tokens": 128},
}
# The table's columns, in order (RESULTS.md uses the same ones).
COLUMNS = (
    "family",
    "contender",
    "tokens/s",
    "speed-up",
    "per-prompt median",
    "per-prompt min",
    "per-prompt max",
    "vs plain_fast",
    "accepted length",
    "accepted by source",
    "identical",
)
CORPUS = ("stdlib", "python-docs", "sharegpt")
CORPUS_LIMIT = 4000

# prompt ids (+ per-call ``generate`` keywords, e.g. ``streamer`` or a shorter ``max_new_tokens``)
# -> (new token ids, rasd stats or None)
Runner = Callable[..., tuple[list[int], dict[str, Any] | None]]


def hf_runner(target, max_new_tokens: int, **kw: Any) -> Runner:
    """HF ``generate`` (greedy) as a runner; ``kw`` makes the contender (e.g. ``assistant_model=draft``)."""

    def run(ids: list[int], **call: Any) -> tuple[list[int], None]:
        x = torch.tensor([ids])
        with torch.inference_mode():
            out = target.generate(
                x,
                attention_mask=torch.ones_like(x),
                **{"max_new_tokens": max_new_tokens, "do_sample": False} | kw | call,
            )
        return out[0, len(ids) :].tolist(), None

    return run


def rasd_runner(target, tokenizer, max_new_tokens: int, **kw: Any) -> Runner:
    """One :class:`SpeculativeGenerator` (greedy) as a runner; ``kw`` makes the contender (its drafters)."""
    gen = SpeculativeGenerator(target, tokenizer=tokenizer, **kw)

    def run(ids: list[int], **call: Any) -> tuple[list[int], dict[str, Any]]:
        res = gen.generate(ids, **{"max_new_tokens": max_new_tokens, "do_sample": False} | call)
        return res.sequences[0, len(ids) :].tolist()[: res.stats.new_tokens], res.stats.to_dict() | {
            "tokens_per_step": list(res.stats.tokens_per_step)
        }

    return run


def make_runners(
    target, draft, store: Datastore, tokenizer, max_new_tokens: int, names, *, rest_index: Path | None = None
) -> dict[str, Runner]:
    """One runner per contender. ``rest_index``: the ``draftretriever`` index of ``rest_native`` (default:
    this benchmark's corpus, the same documents as ``store``)."""

    def hf(**kw: Any) -> Runner:
        return hf_runner(target, max_new_tokens, **kw)

    def ours(**kw: Any) -> Runner:
        return rasd_runner(target, tokenizer, max_new_tokens, **kw)

    factories: dict[str, Callable[[], Runner]] = {
        "hf_plain": lambda: hf(),
        "hf_assisted": lambda: hf(assistant_model=draft),
        "hf_pld": lambda: hf(prompt_lookup_num_tokens=10),
        "plain_fast": lambda: ours(prompt_lookup=False),
        "pld": lambda: ours(prompt_lookup=True),
        "rest": lambda: ours(datastore=store, prompt_lookup=False),
        "rest_native": lambda: ours(
            drafter=rest_native.DraftRetrieverLookup(
                rest_index or rest_native.ensure_index(models.DEFAULT_TARGET, CORPUS, CORPUS_LIMIT)
            )
        ),
        "draft": lambda: ours(draft=draft, prompt_lookup=False),
        "rasd": lambda: ours(draft=draft, datastore=store, prompt_lookup=True),
        "rasd_overlap": lambda: ours(draft=draft, datastore=store, prompt_lookup=True, overlap=True),
    }
    return {name: factories[name]() for name in names}


def _strip_eos(tokens: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in eos:
            return tokens[: i + 1]
    return tokens


def run(args: argparse.Namespace) -> dict[str, Any]:
    profile = PROFILES[args.profile]
    n = args.n or profile["n"]
    max_new_tokens = args.max_new_tokens or profile["max_new_tokens"]
    names = [c for c in CONTENDERS if c in args.contenders.split(",")]
    if "hf_plain" not in names:
        raise SystemExit("hf_plain is the baseline of every ratio: keep it among --contenders")
    if "rest_native" in names and not rest_native.available():
        print(
            "rest_native skipped: REST's draftretriever is not installed (pip install draftretriever==0.1.0)",
            flush=True,
        )
        names.remove("rest_native")
    target, tokenizer = models.load_model(models.DEFAULT_TARGET)
    draft, _ = models.load_model(models.DEFAULT_DRAFT)
    store = Datastore.load(
        ensure_datastore(models.DEFAULT_TARGET, CORPUS, limit=CORPUS_LIMIT), tokenizer=tokenizer
    )
    eos = target.generation_config.eos_token_id
    eos_set = set([eos] if isinstance(eos, int) else (eos or []))
    runners = make_runners(target, draft, store, tokenizer, max_new_tokens, names)

    # Warm-up on a dev prompt: kernel preparation, cost profiles, first-call allocations.
    warm = tasks.prompts("code", "dev", 1)[0].render(tokenizer)
    for name in names:
        runners[name](warm[:64])

    records: list[dict[str, Any]] = []
    families = args.families.split(",")
    rotation = 0  # across families too, so that with one prompt per family the order still varies
    for family in families:
        for prompt in tasks.prompts(family, args.split, n):
            ids = prompt.render(tokenizer)
            order = names[rotation % len(names) :] + names[: rotation % len(names)]
            rotation += 1
            outputs: dict[str, list[int]] = {}
            for name in order:
                gc.collect()
                start = time.perf_counter()
                tokens, stats = runners[name](ids)
                seconds = time.perf_counter() - start
                outputs[name] = _strip_eos(tokens, eos_set)
                records.append(
                    {
                        "family": family,
                        "prompt": prompt.id,
                        "contender": name,
                        "seconds": seconds,
                        "tokens": len(outputs[name]),
                        "stats": stats,
                    }
                )
                print(
                    f"{family:8} {prompt.id:28} {name:12} {len(tokens):4d} tok {seconds:7.2f} s", flush=True
                )
            for r in records[-len(names) :]:
                r["identical"] = outputs[r["contender"]] == outputs["hf_plain"]
    return {
        "profile": args.profile,
        "n": n,
        "max_new_tokens": max_new_tokens,
        "split": args.split,
        "families": families,
        "contenders": names,
        "corpus": list(CORPUS),
        "corpus_limit": CORPUS_LIMIT,
        "datastore": store.info(),
        "records": records,
    }


def _key(record: dict[str, Any]) -> tuple[str, str]:
    return record["family"], record["prompt"]


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (family, contender), then a ``mean`` row per contender over the families.

    speed-up: total ``hf_plain`` seconds / total contender seconds on the same prompts (the mean row
    averages the families' speed-ups, so every family weighs the same); per-prompt median / min / max:
    the spread of the paired per-prompt ratios; vs plain_fast: the same total ratio against rasd's own
    plain decoding; accepted length: tokens committed per target forward over all steps.
    """
    rows = []
    records = payload["records"]
    # Keyed by (family, prompt): DocQA and Summary are built from the same documentation pages, so a
    # prompt id alone names two different prompts (a shared key paired DocQA runs with Summary's
    # baseline and showed HF generate at 0.77x of itself).
    base = {_key(r): r["seconds"] for r in records if r["contender"] == "hf_plain"}
    fast = {_key(r): r["seconds"] for r in records if r["contender"] == "plain_fast"}
    per_family: dict[tuple[str, str], dict[str, Any]] = {}
    for family in payload["families"]:
        for name in payload["contenders"]:
            mine = [r for r in records if r["family"] == family and r["contender"] == name]
            seconds = sum(r["seconds"] for r in mine)
            per_prompt = Summary.of([ratio(base[_key(r)], r["seconds"]) for r in mine])
            row: dict[str, Any] = {
                "family": family,
                "contender": name,
                "tokens/s": sum(r["tokens"] for r in mine) / seconds,
                "speed-up": ratio(sum(base[_key(r)] for r in mine), seconds),
                "per-prompt median": per_prompt.median,
                "per-prompt min": per_prompt.min,
                "per-prompt max": per_prompt.max,
                "vs plain_fast": ratio(sum(fast[_key(r)] for r in mine), seconds) if fast else None,
                "identical": f"{sum(r['identical'] for r in mine)}/{len(mine)}",
            }
            stats = [r["stats"] for r in mine if r["stats"]]
            if stats:
                steps = [t for st in stats for t in st["tokens_per_step"]]
                row["accepted length"] = mean_accepted_length(steps)
                by_source: dict[str, int] = {}
                for st in stats:
                    for k, v in st["accepted_by_source"].items():
                        by_source[k] = by_source.get(k, 0) + v
                row["accepted by source"] = " ".join(f"{k}:{v}" for k, v in sorted(by_source.items())) or "-"
            per_family[(family, name)] = row
            rows.append(row)
    for name in payload["contenders"]:
        fam_rows = [per_family[(f, name)] for f in payload["families"]]
        every_prompt = Summary.of(
            [ratio(base[_key(r)], r["seconds"]) for r in records if r["contender"] == name]
        )
        identical = [r["identical"].split("/") for r in fam_rows]
        rows.append(
            {
                "family": "mean",
                "contender": name,
                "tokens/s": statistics.fmean(r["tokens/s"] for r in fam_rows),
                "speed-up": statistics.fmean(r["speed-up"] for r in fam_rows),
                "per-prompt median": every_prompt.median,
                "per-prompt min": every_prompt.min,
                "per-prompt max": every_prompt.max,
                "vs plain_fast": statistics.fmean(r["vs plain_fast"] for r in fam_rows) if fast else None,
                "identical": f"{sum(int(a) for a, _ in identical)}/{sum(int(b) for _, b in identical)}",
                "accepted length": statistics.fmean(r["accepted length"] for r in fam_rows)
                if "accepted length" in fam_rows[0]
                else None,
            }
        )
    return rows


def plot(payload: dict[str, Any], rows: list[dict[str, Any]], name: str) -> None:
    """Speed-up bars per family, and the accepted-length histogram of the rasd contenders."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    families = payload["families"] + ["mean"]
    names = payload["contenders"]
    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / len(names)
    for j, contender in enumerate(names):
        vals = [
            next(r["speed-up"] for r in rows if r["family"] == f and r["contender"] == contender)
            for f in families
        ]
        ax.bar(np.arange(len(families)) + j * width, vals, width, label=contender)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(np.arange(len(families)) + 0.4 - width / 2, families)
    ax.set_ylabel("speed-up over HF generate (same run)")
    ax.set_title(f"Qwen2.5-Coder-1.5B target, 0.5B draft, {payload['max_new_tokens']} new tokens, greedy")
    ax.legend(ncol=4, fontsize=8)
    save_figure(fig, name)

    ours = [c for c in names if c in ("pld", "rest", "draft", "rasd", "rasd_overlap")]
    if not ours:
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for contender in ours:
        lengths = [
            t
            for r in payload["records"]
            if r["contender"] == contender and r["stats"]
            for t in r["stats"]["tokens_per_step"]
        ]
        if lengths:
            ax.hist(
                lengths,
                bins=np.arange(0.5, max(lengths) + 1.5),
                histtype="step",
                lw=1.5,
                density=True,
                label=f"{contender} (mean {np.mean(lengths):.2f})",
            )
    ax.set_xlabel("tokens committed per target forward")
    ax.set_ylabel("fraction of steps")
    ax.legend(fontsize=8)
    save_figure(fig, f"{name}_accepted")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--families", default=",".join(tasks.FAMILIES))
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--split", choices=tasks.SPLITS, default="test")
    parser.add_argument("--n", type=int, default=None, help="prompts per family (overrides the profile)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--name", default=None, help="result file name (default e2e_<profile>)")
    parser.add_argument(
        "--resummarize",
        action="store_true",
        help="run nothing: recompute the table and plots of results/NAME.json from its records, "
        "keeping the environment and command it was produced with",
    )
    args = parser.parse_args(argv)
    name = args.name or f"e2e_{args.profile}"
    env = None
    command = command_line("benchmarks.bench_e2e", argv)
    if args.resummarize:
        payload = json.loads((RESULTS_DIR / f"{name}.json").read_text())
        env, command = payload.pop("environment"), payload.pop("command", None)
        payload.pop("rows", None)
    else:
        torch.manual_seed(0)
        payload = run(args)
    rows = summarize(payload)
    write_results(
        name,
        payload | {"rows": rows},
        rows,
        columns=COLUMNS,
        title=f"End to end ({payload['profile']}: {payload['n']} prompts per family, "
        f"{payload['max_new_tokens']} new tokens, {payload['split']} split)",
        command=command,
        env=env,
    )
    plot(payload, rows, name)
    print((RESULTS_DIR / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
