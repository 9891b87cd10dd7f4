"""Speculative KNN-LM where retrieval dominates: datastores up to a million entries, side by side.

    python -m benchmarks.bench_knnlm                                   # 100k, 300k, 1M entries, 4 questions
    python -m benchmarks.bench_knnlm --entries 1000000 --questions 8 --repeats 2

Datastore: SmolLM2-135M's final hidden states (576 dims, float32) over the packaged passages in their fixed
order, one entry per token, built once with :meth:`KNNDatastore.build_into` (resumable, memory-mapped) into
``$RASD_CACHE/ralm/knnlm-<model>-<entries>``; smaller sizes are prefixes of the largest store (the first
passages' entries), so one build serves the whole size axis. The build time is reported (a one-time cost).
Questions: FanOutQA dev then MT-Bench, prompt ``Question: ...\\nAnswer:``; greedy, k = 16, λ = 0.25.

Contenders (each checked token-identical to ``baseline_faiss``):

=================  =====================================================================================
baseline_faiss     KNN-LM, one faiss ``IndexFlatL2`` query per token (exact; the usual KNN-LM setup)
baseline           KNN-LM, one query per token on rasd's exact index (``ExactL2Index``: the same
                   neighbours, faster for one query on this CPU: the stronger baseline)
spec               speculative KNN-LM on the exact index: entry cache with the 8 entries after every
                   neighbour, fixed stride 8, batched verification reading the keys once
+os3               ... stride chosen by OS³, which also chooses plain steps when speculation cannot pay
+async             ... + verification in a worker thread while the next step is guessed
+draft             +os3, and the LM runs ahead on the corpus continuation of the neighbours (6 tokens per
                   forward): a right guess of a drafted token costs no LM forward
+guide            +os3, and a faiss IVF index over the same entries (``ivf_probe`` 8) guides every guess: its
                   neighbours join the entry cache's, ranked by exact distance (guesses only: the output is
                   still the exact index's); its build time is reported as a one-time cost
+guide_async       +guide with +async's worker thread
os3_faiss          +os3 on the faiss flat index (a batch costs one scan per query: it should not speculate)
ivf / ivf_os3      KNN-LM and +os3 on a faiss IVF index (approximate, cheap: retrieval is a small share)
=================  =====================================================================================

Every row reports r, the baseline's retrieval share, and the Amdahl bound 1 / (1 - r) on any speed-up that
only hides retrieval; "of bound" is the speed-up over the bound.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from benchmarks.harness import (
    RESULTS_DIR,
    Summary,
    command_line,
    label_axes,
    ratio,
    save_figure,
    write_results,
)
from rasd import models
from rasd._assets import cache_dir
from rasd.ralmspec import KNNLM, KNNConfig, KNNDatastore, SpeculativeKNNLM, passages, questions
from rasd.ralmspec.knnlm import GUIDE_PROBE

# Passages enough for 1M SmolLM2 entries (about 93 tokens each); the store is cut at --entries.
PASSAGES_PER_MILLION = 12000


def full_store(model: Any, tok: Any, model_name: str, entries: int) -> tuple[KNNDatastore, float]:
    """The cached ``entries``-entry store (built on first use, resumably) and the seconds spent building it
    in this process (0 when it was cached)."""
    path = cache_dir() / "ralm" / f"knnlm-{model_name}-{entries}"
    if (path / "meta.json").exists():
        return KNNDatastore.load(path), 0.0
    texts = passages(limit=int(PASSAGES_PER_MILLION * max(1.0, entries / 1e6)) + 1000)
    start = time.perf_counter()
    store = KNNDatastore.build_into(path, model, tok, texts, max_entries=entries, progress=True)
    return store, time.perf_counter() - start


ALL = (
    "baseline_faiss",
    "baseline",
    "spec",
    "+os3",
    "+async",
    "+draft",
    "+guide",
    "+guide_async",
    "os3_faiss",
    "ivf",
    "ivf_os3",
)


def contenders(
    model: Any, store: KNNDatastore, n: int, cfg: KNNConfig, names: Sequence[str] = ALL
) -> tuple[dict[str, Any], dict[str, float]]:
    """The ``names`` contenders (see the module docstring) over the first ``n`` entries of ``store``, and
    the seconds each index took to build (one-time costs a user pays per process), and the first pass
    the exact index chose ("bf16" or "fp32", measured at its construction)."""
    keys, values, tag = store.keys[:n], store.values[:n], store.model_tag
    t0 = time.perf_counter()
    exact = KNNDatastore(keys, values, index_kind="exact", model_tag=tag)
    t1 = time.perf_counter()
    flat = KNNDatastore(keys, values, index_kind="flat", model_tag=tag)
    t2 = time.perf_counter()
    needs_ivf = any(c.startswith("ivf") for c in names)
    ivf = KNNDatastore(keys, values, index_kind="ivf", model_tag=tag) if needs_ivf else None
    t3 = time.perf_counter()
    needs_guide = any(c.startswith("+guide") for c in names)
    guide = (
        KNNDatastore(keys, values, index_kind="ivf", ivf_probe=GUIDE_PROBE, model_tag=tag)
        if needs_guide
        else None
    )
    t4 = time.perf_counter()
    builds = {"exact": t1 - t0, "flat": t2 - t1, "ivf": t3 - t2, "guide": t4 - t3}
    print(
        f"{n} entries, index builds: "
        + ", ".join(f"{k} {v:.1f}s" for k, v in builds.items())
        + f"; exact index first pass: {exact.index.first_pass}",
        flush=True,
    )
    every = {
        "baseline_faiss": KNNLM(model, flat, cfg),
        "baseline": KNNLM(model, exact, cfg),
        "spec": SpeculativeKNNLM(model, exact, cfg, lookahead=8, scheduler=8),
        "+os3": SpeculativeKNNLM(model, exact, cfg, lookahead=8, scheduler="os3"),
        "+async": SpeculativeKNNLM(model, exact, cfg, lookahead=8, scheduler="os3", async_verify=True),
        "+draft": SpeculativeKNNLM(model, exact, cfg, lookahead=8, scheduler="os3", draft_tokens=6),
        "+guide": SpeculativeKNNLM(model, exact, cfg, lookahead=8, scheduler="os3", guide=guide)
        if guide
        else None,
        "+guide_async": SpeculativeKNNLM(
            model, exact, cfg, lookahead=8, scheduler="os3", async_verify=True, guide=guide
        )
        if guide
        else None,
        "os3_faiss": SpeculativeKNNLM(model, flat, cfg, lookahead=8, scheduler="os3"),
        "ivf": KNNLM(model, ivf, cfg) if ivf else None,
        "ivf_os3": SpeculativeKNNLM(model, ivf, cfg, lookahead=8, scheduler="os3") if ivf else None,
    }
    return {c: every[c] for c in names}, builds, exact.index.first_pass


# Which baseline each contender is compared with (the same index kind).
BASELINE_OF = {
    "os3_faiss": "baseline_faiss",
    "ivf_os3": "ivf",
    "baseline_faiss": "baseline_faiss",
    "ivf": "ivf",
}


def parse_contenders(text: str) -> list[str]:
    """The named contenders plus the baselines they are compared with, in :data:`ALL`'s order."""
    names = {c.strip() for c in text.split(",") if c.strip()}
    unknown = names - set(ALL)
    if unknown:
        raise SystemExit(f"unknown contenders {sorted(unknown)}; choose from {', '.join(ALL)}")
    names |= {"baseline_faiss"} | {BASELINE_OF.get(c, "baseline") for c in names}
    return [c for c in ALL if c in names]


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = models.load_model(args.model)
    sizes = sorted(int(s) for s in args.entries.split(","))
    store, build_s = full_store(model, tok, args.model, max(sizes))
    cfg = KNNConfig(max_new_tokens=args.max_new_tokens)
    prompts = [tok(f"Question: {q}\nAnswer:").input_ids for q in questions(args.questions)]
    records: list[dict[str, Any]] = []
    index_build_s: dict[str, dict[str, float]] = {}
    first_pass: dict[str, str] = {}
    for n in sizes:
        runners, index_build_s[str(n)], first_pass[str(n)] = contenders(model, store, n, cfg, args.contenders)
        names = list(runners)
        for name in names:  # warm-up: page the keys in, build lazy state
            runners[name].generate(prompts[0][:12])
        for rep in range(args.repeats):
            for i, prompt in enumerate(prompts):
                shift = (i + rep) % len(names)  # rotate the order per question and round
                outs = {}
                for name in names[shift:] + names[:shift]:
                    gc.collect()
                    start = time.perf_counter()
                    out = runners[name].generate(prompt)
                    seconds = time.perf_counter() - start
                    outs[name] = out.tokens
                    records.append(
                        {
                            "entries": n,
                            "question": i,
                            "repeat": rep,
                            "contender": name,
                            "seconds": seconds,
                            "tokens": len(out.tokens),
                            "stats": out.stats.to_dict(),
                        }
                    )
                for r in records[-len(names) :]:
                    r["identical"] = outs[r["contender"]] == outs["baseline_faiss"]
                    r["identical_to_own_baseline"] = (
                        outs[r["contender"]] == outs[BASELINE_OF.get(r["contender"], "baseline")]
                    )
                print(
                    f"{n:8d} q{i} r{rep}: "
                    + " ".join(f"{r['contender']}={r['seconds']:.2f}s" for r in records[-len(names) :]),
                    flush=True,
                )
        del runners
        gc.collect()
    return {
        "model": args.model,
        "entries": sizes,
        "store_bytes": int(store.keys.nbytes + store.values.nbytes),
        "build_s": build_s,
        "index_build_s": index_build_s,
        "exact_first_pass": first_pass,
        "questions": args.questions,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "records": records,
    }


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (entries, contender): speed-up over its own index's baseline and over the faiss baseline
    (total seconds over the same runs), r and the Amdahl bound of the baseline it is compared with."""
    rows = []
    recs = payload["records"]
    key = lambda r: (r["question"], r["repeat"])  # noqa: E731
    for n in payload["entries"]:
        mine = [r for r in recs if r["entries"] == n]
        by = {
            c: {key(r): r for r in mine if r["contender"] == c}
            for c in dict.fromkeys(r["contender"] for r in mine)
        }

        for c, runs in by.items():
            own = BASELINE_OF.get(c, "baseline")
            base_runs = by[own].values()
            r_own = sum(r["stats"]["time_retrieval"] for r in base_runs) / sum(
                r["seconds"] for r in base_runs
            )
            secs = sum(r["seconds"] for r in runs.values())
            speedup = ratio(sum(by[own][k]["seconds"] for k in runs), secs)
            paired = Summary.of([ratio(by[own][k]["seconds"], r["seconds"]) for k, r in runs.items()])
            hits = sum(r["stats"]["hits"] for r in runs.values())
            misses = sum(r["stats"]["misses"] for r in runs.values())
            strides = [s for r in runs.values() for s in r["stats"]["chosen_strides"]]
            steps = sum(r["tokens"] for r in runs.values())
            bound = 1.0 / (1.0 - r_own) if r_own < 1 else float("inf")
            rows.append(
                {
                    "entries": n,
                    "contender": c,
                    "vs": own,
                    "speed-up": speedup,
                    "per-run min": paired.min,
                    "per-run max": paired.max,
                    "vs baseline_faiss": ratio(sum(by["baseline_faiss"][k]["seconds"] for k in runs), secs),
                    "r (its baseline)": r_own,
                    "Amdahl bound": bound,
                    "of bound": speedup / bound,
                    "hit rate": hits / (hits + misses) if hits + misses else None,
                    "mean stride": float(np.mean([s for s in strides if s])) if any(strides) else None,
                    "plain steps": sum(r["stats"].get("plain_steps", 0) for r in runs.values()) / steps
                    if c
                    in ("+os3", "+async", "+draft", "+guide", "+guide_async", "os3_faiss", "ivf_os3", "spec")
                    else None,
                    "kb calls/token": sum(r["stats"]["kb_calls"] for r in runs.values()) / steps,
                    "LM forwards/token": sum(r["stats"].get("lm_forwards", 0) for r in runs.values()) / steps,
                    "identical": f"{sum(r['identical'] for r in runs.values())}/{len(runs)}",
                }
            )
    return rows


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, rx) = plt.subplots(1, 2, figsize=(11, 4))
    styles = (
        ("baseline", "k--"),
        ("spec", "s--"),
        ("+os3", "o-"),
        ("+async", "^:"),
        ("+draft", "v-"),
        ("+guide", "D-"),
        ("+guide_async", "d:"),
    )
    for c, style in styles:
        pts = [(r["entries"], r["vs baseline_faiss"]) for r in rows if r["contender"] == c]
        if pts:
            ax.plot(*zip(*pts, strict=True), style, label=c)
    bound = sorted({(r["entries"], r["Amdahl bound"]) for r in rows if r["contender"] == "baseline_faiss"})
    ax.plot(*zip(*bound, strict=True), "k:", label="Amdahl bound 1/(1-r)")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    label_axes(ax, "datastore entries", "speed-up over KNN-LM with faiss flat", "Speculative KNN-LM, CPU")
    for c, style in (("baseline_faiss", "x-"), ("baseline", "o-"), ("ivf", "d-")):
        pts = [(r["entries"], r["r (its baseline)"]) for r in rows if r["contender"] == c]
        if pts:
            rx.plot(*zip(*pts, strict=True), style, label=c)
    rx.set_xscale("log")
    label_axes(rx, "datastore entries", "retrieval share r of the baseline", "Where retrieval dominates")
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", choices=list(models.REGISTRY))
    parser.add_argument("--entries", default="100000,300000,1000000")
    parser.add_argument("--questions", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all questions (order rotated)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--name", default="knnlm")
    parser.add_argument(
        "--contenders",
        default=",".join(ALL),
        help="comma-separated subset (each with its baseline: baseline_faiss, baseline, ivf)",
    )
    args = parser.parse_args(argv)
    args.contenders = parse_contenders(args.contenders)
    payload = run(args)
    rows = summarize(payload)
    write_results(
        args.name,
        payload | {"rows": rows},
        rows,
        title=f"Speculative KNN-LM vs KNN-LM ({args.model}, {args.questions} questions, "
        f"{args.max_new_tokens} new tokens, CPU)",
        command=command_line("benchmarks.bench_knnlm", argv),
    )
    plot(rows, args.name)
    print((RESULTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
