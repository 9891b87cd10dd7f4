"""Datastore figures: build throughput, file size, open time, and query latency against a Python reference.

    python -m benchmarks.bench_datastore                 # stdlib code, SmolLM2 tokenizer, 3 corpus sizes
    python -m benchmarks.bench_datastore --tokenizer qwen2.5-coder-1.5b

The corpus is this interpreter's standard library tokenized with the SmolLM2 tokenizer (vocabulary < 65,536,
so REST's u16 store could take it) or any registry tokenizer, cut to each size in tokens. Queries are
contexts of 32 tokens taken from held-out stdlib files (real code that is *not* in the store, as at
generation time), each followed by its true next 16 tokens. Per query: ``match`` (longest suffix length)
and ``retrieve`` (a 64-node retrieval tree, depth 16) with the native suffix automaton, p50 and p99; the
accepted length the tree would give against the true continuation (greedy walk); and the same
longest-suffix match by a vectorised numpy scan of the token array (what a store without an index does;
every match length is checked equal to the native one).

REST's ``draftretriever`` and ArcticInference's ``arctic-inference`` ship only as source distributions that
need a Rust / CUDA toolchain, so they are not part of this run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Any

import numpy as np

from benchmarks.harness import RESULTS_DIR, command_line, write_results
from rasd import data, models
from rasd.datastore import Datastore


def numpy_longest_match(corpus: np.ndarray, doc_ends: np.ndarray, context: np.ndarray) -> int:
    """Longest suffix of ``context`` occurring in ``corpus`` without crossing a document end (reference)."""
    best = 0
    candidates = np.flatnonzero(corpus == context[-1])
    length = 1
    while len(candidates):
        best = length
        if length == len(context):
            break
        prev = candidates - length
        ok = prev >= 0
        prev = prev[ok]
        cand = candidates[ok]
        # a match may not cross a document boundary: the previous token must lie in the same document
        same_doc = np.searchsorted(doc_ends, prev, side="right") == np.searchsorted(
            doc_ends, cand, side="right"
        )
        keep = same_doc & (corpus[prev] == context[-1 - length])
        candidates = cand[keep]
        length += 1
    return best


def _accepted(tree, truth: np.ndarray) -> int:
    """Tokens of the true continuation the tree predicts (greedy walk from the root)."""
    parents, tokens = tree.parents.tolist(), tree.tokens.tolist()
    node, depth = -1, 0
    while depth < len(truth):
        nxt = next((i for i, p in enumerate(parents) if p == node and tokens[i] == truth[depth]), None)
        if nxt is None:
            break
        node, depth = nxt, depth + 1
    return depth


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000000,4000000,16000000", help="corpus sizes in tokens")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--tokenizer", default="smollm2-135m", choices=list(models.REGISTRY))
    parser.add_argument("--name", default="datastore")
    args = parser.parse_args(argv)
    sizes = sorted(int(s) for s in args.sizes.split(","))
    tok = models.load_tokenizer(args.tokenizer)
    files = list(data.stdlib_code())
    held_out = files[-40:]
    docs: list[np.ndarray] = []
    total = 0
    for f in files[:-40]:
        ids = np.asarray(tok(f.text, add_special_tokens=False).input_ids, dtype=np.int32)
        docs.append(ids)
        total += len(ids)
        if total >= sizes[-1]:
            break
    rng = np.random.default_rng(0)
    queries = []
    for _ in range(args.queries):
        f = held_out[rng.integers(len(held_out))]
        ids = np.asarray(tok(f.text[:4000], add_special_tokens=False).input_ids, dtype=np.int32)
        if len(ids) > 64:
            start = rng.integers(0, len(ids) - 48)
            queries.append((ids[start : start + 32], ids[start + 32 : start + 48]))
    rows: list[dict[str, Any]] = []
    for size in sizes:
        store = Datastore(vocab_size=len(tok))
        corpus_parts, ends, n = [], [], 0
        t0 = time.perf_counter()
        for d in docs:
            d = d[: size - n]
            store.add(d)
            corpus_parts.append(d)
            n += len(d)
            ends.append(n)
            if n >= size:
                break
        build = time.perf_counter() - t0
        corpus = np.concatenate(corpus_parts)
        doc_ends = np.asarray(ends) - 1
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "store.rasd")
            t0 = time.perf_counter()
            store.save(path)
            save = time.perf_counter() - t0
            file_mb = os.path.getsize(path) / 2**20
            t0 = time.perf_counter()
            loaded = Datastore.load(path, verify=False)
            open_ms = 1e3 * (time.perf_counter() - t0)
            match_t, retrieve_t, ref_t, lengths, accepted = [], [], [], [], []
            for q, truth in queries:
                t0 = time.perf_counter()
                m = loaded.match(q)
                match_t.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                tree = loaded.retrieve(q, max_nodes=64, max_depth=16)
                retrieve_t.append(time.perf_counter() - t0)
                accepted.append(_accepted(tree, truth))
                t0 = time.perf_counter()
                ref = numpy_longest_match(corpus, doc_ends, q)
                ref_t.append(time.perf_counter() - t0)
                if ref != m:
                    raise AssertionError(f"native match {m} != reference {ref}")
                lengths.append(m)
            del loaded
        rows.append(
            {
                "tokens": len(store),
                "documents": store.num_documents,
                "build s": build,
                "build Mtok/s": len(store) / build / 1e6,
                "save s": save,
                "file MB": file_mb,
                "open ms (mmap)": open_ms,
                "match us": 1e6 * statistics.median(match_t),
                "retrieve us p50": 1e6 * statistics.median(retrieve_t),
                "retrieve us p99": 1e6 * float(np.percentile(retrieve_t, 99)),
                "accepted vs truth": float(np.mean(accepted)),
                "file bytes/token": file_mb * 2**20 / len(store),
                "numpy scan us": 1e6 * statistics.median(ref_t),
                "scan / match": statistics.median(ref_t) / statistics.median(match_t),
                "mean match length": float(np.mean(lengths)),
            }
        )
        print(rows[-1], flush=True)
    write_results(
        args.name,
        {"queries": len(queries), "tokenizer": args.tokenizer, "rows": rows},
        rows,
        title=f"Suffix-automaton datastore (stdlib code, {args.tokenizer} tokenizer, medians over "
        f"{len(queries)} held-out 32-token contexts)",
        command=command_line("benchmarks.bench_datastore", argv),
    )
    print((RESULTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
