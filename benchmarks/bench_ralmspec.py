"""RaLMSpec vs the iterative RaLM baseline, per retriever and corpus size, side by side in one process.

    python -m benchmarks.bench_ralmspec                          # quick: SmolLM2-135M, 1k and 4k passages
    python -m benchmarks.bench_ralmspec --sizes 1000,4000,16000 --questions 8 --model qwen2.5-coder-0.5b

Knowledge base: ~100-word passages of the packaged Wikipedia summaries (en, es, fr) then the Python docs,
cut to each corpus size (smaller corpora are prefixes of larger ones; embeddings are computed once with
all-MiniLM-L6-v2 and cached in ``$RASD_CACHE/ralm``). Questions: FanOutQA dev then MT-Bench, prompt
``Question: ...\\nAnswer:``. Greedy, stride 4, query = last 32 tokens, passage cut to 256 tokens.

Contenders (each checked token-identical to ``baseline``; extras switched on in turn):

==============  ===========================================================================
baseline        iterative RaLM, one knowledge-base call per stride (the paper's baseline)
spec            RaLMSpec, cache top-1 only (no prefetch), fixed speculation stride 3
+prefetch       ... + top-20 prefetching into the cache
+os3            ... + the OS³ stride scheduler
+async          ... + asynchronous verification in a worker thread
baseline_kv     the baseline reusing the KV cache while the passage is unchanged (stronger baseline)
all_kv          RaLMSpec with every extra and KV reuse (compared with baseline_kv *and* baseline)
==============  ===========================================================================

Retrievers ``milvus`` / ``milvus_hnsw``: the same embeddings in a Milvus collection (a milvus-lite file in a
temporary directory; FLAT or HNSW), through :class:`~rasd.ralmspec.milvus.MilvusRetriever`: the engine's
per-call latency is part of every knowledge-base call.

Retriever ``knnlm``: KNN-LM over a datastore of the model's own hidden states on the same passages (one
entry per token, faiss exact L2), one datastore query per generated token; it runs only at the
``--knn-sizes`` corpus sizes. Its contenders: ``baseline`` (KNN-LM), ``spec`` (speculative, cache =
returned neighbours only, 3 steps per verification), ``+prefetch`` (the 8 entries after every neighbour
enter the cache too), ``+os3`` and ``+async``.

Every row also reports the baseline's mean latency of one knowledge-base query, so the sweep over corpus
sizes shows how retrieval cost grows with the corpus (right panel of the plot).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
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
from rasd.ralmspec import (
    KNNLM,
    BM25Retriever,
    DenseRetriever,
    IterativeRaLM,
    KNNConfig,
    KNNDatastore,
    MilvusRetriever,
    MiniLMEncoder,
    RaLMConfig,
    RaLMSpec,
    SpeculativeKNNLM,
    passages,
    questions,
)

SPEC_VARIANTS = {
    "spec": {"prefetch": 1, "scheduler": 3},
    "+prefetch": {"prefetch": 20, "scheduler": 3},
    "+os3": {"prefetch": 20, "scheduler": "os3"},
    "+async": {"prefetch": 20, "scheduler": "os3", "async_verify": True},
}
# KNN-LM: one token per datastore query; the cache takes every neighbour and the n entries after it.
KNN_VARIANTS = {
    "spec": {"lookahead": 0, "scheduler": 3},
    "+prefetch": {"lookahead": 8, "scheduler": 3},
    "+os3": {"lookahead": 8, "scheduler": "os3"},
    "+async": {"lookahead": 8, "scheduler": "os3", "async_verify": True},
}


def embeddings_for(texts: list[str], encoder: MiniLMEncoder) -> np.ndarray:
    """Embeddings of ``texts`` (a prefix of the fixed passage order), cached on disk."""
    path = cache_dir() / "ralm" / "minilm-passages.npy"
    have = np.load(path) if path.exists() else np.zeros((0, encoder.dim), np.float32)
    if len(have) < len(texts):
        more = encoder.encode(texts[len(have) :], progress=True)
        have = np.concatenate([have, more])
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, have)
        tmp.replace(path)
    return have[: len(texts)]


def knn_store_for(model, tok, model_name: str, texts: list[str]) -> KNNDatastore:
    """The KNN-LM datastore of ``model`` over ``texts`` (a prefix of the fixed passage order), cached on disk:
    building it runs the LM over every passage (minutes per thousand passages on this CPU; an interrupted
    build resumes). The directory names the passage count (bench_knnlm's stores name their entry count)."""
    path = cache_dir() / "ralm" / f"knnlm-{model_name}-{len(texts)}passages"
    if (path / "meta.json").exists():
        return KNNDatastore.load(path)
    return KNNDatastore.build_into(path, model, tok, texts, progress=True)


def index_latency_ms(retriever: Any, prompts: list[list[int]], tok: Any, encoder: MiniLMEncoder) -> float:
    """Median milliseconds of one top-20 knowledge-base search with the query already embedded: the index
    alone, which is what grows with the corpus (embedding a query costs the same at every size). For
    KNN-LM, one search for a hidden state."""
    if isinstance(retriever, KNNDatastore):
        keys = retriever.keys[: min(64, len(retriever))]
        return 1e3 * _median_seconds([lambda q=q: retriever.search(q[None], 16) for q in keys])
    queries = [tok.decode(p[-32:]) for p in prompts] * 4
    encoder.encode_queries(queries)  # cached: the timed calls below only search
    return 1e3 * _median_seconds([lambda q=q: retriever.search([q], 20) for q in queries])


def _median_seconds(calls: list[Any]) -> float:
    calls[0]()
    times = []
    for call in calls:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = models.load_model(args.model)
    encoder = MiniLMEncoder()
    sizes = [int(s) for s in args.sizes.split(",")]
    knn_sizes = {int(s) for s in args.knn_sizes.split(",")}
    all_passages = passages(limit=max(sizes))
    all_emb = embeddings_for(all_passages, encoder)
    prompts = [tok(f"Question: {q}\nAnswer:").input_ids for q in questions(args.questions)]
    records: list[dict[str, Any]] = []
    scratch = tempfile.mkdtemp(prefix="rasd-milvus-")  # the milvus-lite file, removed after the run
    for size in sizes:
        ps = all_passages[:size]
        for kind in args.retrievers.split(","):
            if kind == "knnlm" and size not in knn_sizes:
                continue
            t0 = time.perf_counter()
            if kind == "knnlm":
                retriever = knn_store_for(model, tok, args.model, ps)
                kcfg = KNNConfig(max_new_tokens=args.max_new_tokens)
                runners = {"baseline": KNNLM(model, retriever, kcfg)}
                runners |= {
                    n: SpeculativeKNNLM(model, retriever, kcfg, **kw) for n, kw in KNN_VARIANTS.items()
                }
            else:
                if kind == "bm25":
                    retriever = BM25Retriever.build(ps)
                elif kind.startswith("milvus"):
                    uri = os.path.join(scratch, "kb.db")
                    retriever = MilvusRetriever.build(
                        ps,
                        uri,
                        f"kb_{kind}_{size}",
                        embeddings=all_emb[:size],
                        index="HNSW" if kind == "milvus_hnsw" else "FLAT",
                        encoder=encoder,
                        overwrite=True,
                        progress=False,
                    )
                else:
                    retriever = DenseRetriever(ps, all_emb[:size], kind=kind, encoder=encoder)
                cfg = RaLMConfig(max_new_tokens=args.max_new_tokens)
                cfg_kv = RaLMConfig(max_new_tokens=args.max_new_tokens, reuse_kv=True)
                runners = {"baseline": IterativeRaLM(model, tok, retriever, cfg)}
                runners |= {n: RaLMSpec(model, tok, retriever, cfg, **kw) for n, kw in SPEC_VARIANTS.items()}
                runners["baseline_kv"] = IterativeRaLM(model, tok, retriever, cfg_kv)
                runners["all_kv"] = RaLMSpec(model, tok, retriever, cfg_kv, **SPEC_VARIANTS["+async"])
            build_s = time.perf_counter() - t0
            index_ms = index_latency_ms(retriever, prompts, tok, encoder)
            names = list(runners)
            runners["baseline"].generate(prompts[0][:16])  # warm-up
            for rep in range(args.repeats):
                for i, prompt in enumerate(prompts):
                    # Rotate the order per question and per round, so no contender always runs first.
                    shift = (i + rep) % len(names)
                    order = names[shift:] + names[:shift]
                    outs = {}
                    for name in order:
                        gc.collect()
                        encoder.clear_cache()  # every run embeds its own queries (none rides on another's)
                        start = time.perf_counter()
                        out = runners[name].generate(prompt)
                        seconds = time.perf_counter() - start
                        outs[name] = out.tokens
                        records.append(
                            {
                                "size": size,
                                "retriever": kind,
                                "kb_entries": len(retriever),
                                "build_s": build_s,
                                "index_ms": index_ms,
                                "question": i,
                                "repeat": rep,
                                "contender": name,
                                "seconds": seconds,
                                "tokens": len(out.tokens),
                                "stats": out.stats.to_dict(),
                            }
                        )
                    for r in records[-len(names) :]:
                        r["identical"] = outs[r["contender"]] == outs["baseline"]
                    print(
                        f"{size:6d} {kind:5} q{i} r{rep}: "
                        + " ".join(f"{r['contender']}={r['seconds']:.2f}s" for r in records[-len(names) :]),
                        flush=True,
                    )
            del runners, retriever
            gc.collect()
    shutil.rmtree(scratch, ignore_errors=True)
    return {
        "model": args.model,
        "sizes": sizes,
        "questions": args.questions,
        "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens,
        "records": records,
    }


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (corpus size, retriever, contender).

    speed-up: total baseline seconds / total contender seconds over the same (question, round) runs;
    per-run median / min / max: the spread of the paired ratios (baseline / contender on the same question
    in the same round), so one noisy run shows up instead of vanishing into a total.
    """
    rows = []
    recs = payload["records"]
    for size in payload["sizes"]:
        for kind in dict.fromkeys(r["retriever"] for r in recs):
            mine = [r for r in recs if r["size"] == size and r["retriever"] == kind]
            if not mine:
                continue
            run_key = lambda r: (r["question"], r.get("repeat", 0))  # noqa: E731
            base = {run_key(r): r for r in mine if r["contender"] == "baseline"}
            base_kv = {run_key(r): r for r in mine if r["contender"] == "baseline_kv"}
            retrieval_share = sum(r["stats"]["time_retrieval"] for r in base.values()) / sum(
                r["seconds"] for r in base.values()
            )
            kb_latency = sum(r["stats"]["time_retrieval"] for r in base.values()) / sum(
                r["stats"]["kb_calls"] for r in base.values()
            )
            for c in dict.fromkeys(r["contender"] for r in mine):
                cr = [r for r in mine if r["contender"] == c]
                secs = sum(r["seconds"] for r in cr)
                paired = Summary.of([ratio(base[run_key(r)]["seconds"], r["seconds"]) for r in cr])
                hits = sum(r["stats"]["hits"] for r in cr)
                misses = sum(r["stats"]["misses"] for r in cr)
                strides = [s for r in cr for s in r["stats"]["chosen_strides"]]
                rows.append(
                    {
                        "passages": size,
                        "retriever": kind,
                        "contender": c,
                        "speed-up": ratio(sum(base[run_key(r)]["seconds"] for r in cr), secs),
                        "per-run median": paired.median,
                        "per-run min": paired.min,
                        "per-run max": paired.max,
                        "kb entries": mine[0]["kb_entries"],
                        "vs baseline_kv": ratio(sum(base_kv[run_key(r)]["seconds"] for r in cr), secs)
                        if base_kv
                        else None,
                        "hit rate": hits / (hits + misses) if hits + misses else None,
                        "mean stride": float(np.mean(strides)) if strides else None,
                        "kb calls": sum(r["stats"]["kb_calls"] for r in cr) / len(cr),
                        "kb query ms (baseline)": 1e3 * kb_latency,
                        "index ms": mine[0].get("index_ms"),
                        "retrieval share (baseline)": retrieval_share,
                        "Amdahl bound": 1.0 / (1.0 - retrieval_share),
                        "identical": f"{sum(r['identical'] for r in cr)}/{len(cr)}",
                    }
                )
    return rows


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lat) = plt.subplots(1, 2, figsize=(11, 4))
    for kind in dict.fromkeys(r["retriever"] for r in rows):
        base = [(r["passages"], r["index ms"]) for r in rows if r["retriever"] == kind and r["index ms"]]
        if base:
            lat.plot(*zip(*sorted(set(base)), strict=True), "o-", label=kind)
        styles = (("+async", "^:"),) if kind == "knnlm" else (("+async", "o-"), ("all_kv", "s--"))
        for contender, style in styles:
            pts = [
                (r["passages"], r["speed-up"])
                for r in rows
                if r["retriever"] == kind and r["contender"] == contender
            ]
            if pts:
                ax.plot(*zip(*pts, strict=True), style, label=f"{kind} {contender}")
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xscale("log")
    label_axes(ax, "knowledge-base passages", "speed-up over iterative RaLM", "RaLMSpec, CPU")
    lat.set_xscale("log")
    lat.set_yscale("log")
    label_axes(
        lat, "knowledge-base passages", "one index search (embedded query), ms", "Index latency vs corpus"
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", choices=list(models.REGISTRY))
    parser.add_argument("--retrievers", default="flat,hnsw,bm25,milvus,milvus_hnsw,knnlm")
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument(
        "--knn-sizes",
        default="1000",
        help="corpus sizes (of --sizes) at which KNN-LM runs: its datastore runs the LM over every passage "
        "(about 3 min per 1000 passages on a 2-core CPU; cached afterwards)",
    )
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds over all questions (order rotated every round)"
    )
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--name", default="ralmspec")
    args = parser.parse_args(argv)
    payload = run(args)
    rows = summarize(payload)
    write_results(
        args.name,
        payload | {"rows": rows},
        rows,
        title=f"RaLMSpec vs iterative RaLM ({args.model}, {args.questions} questions, "
        f"{args.max_new_tokens} new tokens, CPU)",
        command=command_line("benchmarks.bench_ralmspec", argv),
    )
    plot(rows, args.name)
    print((RESULTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
