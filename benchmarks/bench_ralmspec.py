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
import time
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS_DIR, command_line, label_axes, save_figure, write_results
from rasd import models
from rasd._assets import cache_dir
from rasd.ralmspec import (
    KNNLM,
    BM25Retriever,
    DenseRetriever,
    IterativeRaLM,
    KNNConfig,
    KNNDatastore,
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
    building it runs the LM over every passage (minutes per thousand passages on this CPU)."""
    path = cache_dir() / "ralm" / f"knnlm-{model_name}-{len(texts)}"
    if (path / "meta.json").exists():
        return KNNDatastore.load(path)
    store = KNNDatastore.build(model, tok, texts, progress=True)
    store.save(path)
    return store


def run(args: argparse.Namespace) -> dict[str, Any]:
    model, tok = models.load_model(args.model)
    encoder = MiniLMEncoder()
    sizes = [int(s) for s in args.sizes.split(",")]
    knn_sizes = {int(s) for s in args.knn_sizes.split(",")}
    all_passages = passages(limit=max(sizes))
    all_emb = embeddings_for(all_passages, encoder)
    prompts = [tok(f"Question: {q}\nAnswer:").input_ids for q in questions(args.questions)]
    records: list[dict[str, Any]] = []
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
                else:
                    retriever = DenseRetriever(ps, all_emb[:size], kind=kind, encoder=encoder)
                cfg = RaLMConfig(max_new_tokens=args.max_new_tokens)
                cfg_kv = RaLMConfig(max_new_tokens=args.max_new_tokens, reuse_kv=True)
                runners = {"baseline": IterativeRaLM(model, tok, retriever, cfg)}
                runners |= {n: RaLMSpec(model, tok, retriever, cfg, **kw) for n, kw in SPEC_VARIANTS.items()}
                runners["baseline_kv"] = IterativeRaLM(model, tok, retriever, cfg_kv)
                runners["all_kv"] = RaLMSpec(model, tok, retriever, cfg_kv, **SPEC_VARIANTS["+async"])
            build_s = time.perf_counter() - t0
            names = list(runners)
            runners["baseline"].generate(prompts[0][:16])  # warm-up
            for i, prompt in enumerate(prompts):
                order = names[i % len(names) :] + names[: i % len(names)]
                outs = {}
                for name in order:
                    gc.collect()
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
                            "question": i,
                            "contender": name,
                            "seconds": seconds,
                            "tokens": len(out.tokens),
                            "stats": out.stats.to_dict(),
                        }
                    )
                for r in records[-len(names) :]:
                    r["identical"] = outs[r["contender"]] == outs["baseline"]
                print(
                    f"{size:6d} {kind:5} q{i}: "
                    + " ".join(f"{r['contender']}={r['seconds']:.2f}s" for r in records[-len(names) :]),
                    flush=True,
                )
            del runners, retriever
            gc.collect()
    return {
        "model": args.model,
        "sizes": sizes,
        "questions": args.questions,
        "max_new_tokens": args.max_new_tokens,
        "records": records,
    }


def summarize(payload: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    recs = payload["records"]
    for size in payload["sizes"]:
        for kind in dict.fromkeys(r["retriever"] for r in recs):
            mine = [r for r in recs if r["size"] == size and r["retriever"] == kind]
            if not mine:
                continue
            total = {
                c: sum(r["seconds"] for r in mine if r["contender"] == c)
                for c in dict.fromkeys(r["contender"] for r in mine)
            }
            base = [r for r in mine if r["contender"] == "baseline"]
            retrieval_share = sum(r["stats"]["time_retrieval"] for r in base) / sum(
                r["seconds"] for r in base
            )
            kb_latency = sum(r["stats"]["time_retrieval"] for r in base) / sum(
                r["stats"]["kb_calls"] for r in base
            )
            for c, secs in total.items():
                cr = [r for r in mine if r["contender"] == c]
                hits = sum(r["stats"]["hits"] for r in cr)
                misses = sum(r["stats"]["misses"] for r in cr)
                strides = [s for r in cr for s in r["stats"]["chosen_strides"]]
                rows.append(
                    {
                        "passages": size,
                        "retriever": kind,
                        "contender": c,
                        "speed-up": total["baseline"] / secs,
                        "kb entries": mine[0]["kb_entries"],
                        "vs baseline_kv": total["baseline_kv"] / secs if "baseline_kv" in total else None,
                        "hit rate": hits / (hits + misses) if hits + misses else None,
                        "mean stride": float(np.mean(strides)) if strides else None,
                        "kb calls": sum(r["stats"]["kb_calls"] for r in cr) / len(cr),
                        "kb query ms (baseline)": 1e3 * kb_latency,
                        "retrieval share (baseline)": retrieval_share,
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
        base = [(r["passages"], r["kb query ms (baseline)"]) for r in rows if r["retriever"] == kind]
        base = sorted(set(base))
        lat.plot(*zip(*base, strict=True), "o-", label=kind)
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
        lat, "knowledge-base passages", "one knowledge-base query, ms", "Retrieval latency vs corpus size"
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m", choices=list(models.REGISTRY))
    parser.add_argument("--retrievers", default="flat,hnsw,bm25,knnlm")
    parser.add_argument("--sizes", default="1000,4000")
    parser.add_argument(
        "--knn-sizes",
        default="1000",
        help="corpus sizes (of --sizes) at which KNN-LM runs: its datastore runs the LM over every passage "
        "(about 3 min per 1000 passages on a 2-core CPU; cached afterwards)",
    )
    parser.add_argument("--questions", type=int, default=3)
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
