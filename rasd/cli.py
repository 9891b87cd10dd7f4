"""The ``rasd`` command line. Each command group has an ``_add_<group>`` function that declares its
arguments and a handler; handlers import heavy modules (torch, transformers) lazily so that
``rasd --help`` stays instant."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Sequence

from rasd import __version__
from rasd._assets import AssetError
from rasd.datastore import CORPORA, corpus_documents


def _add_models(sub: argparse._SubParsersAction) -> None:
    from rasd import models

    p = sub.add_parser("models", help="install, convert and inspect the packaged models")
    msub = p.add_subparsers(dest="models_cmd", required=True)

    q = msub.add_parser("list", help="show every registry model and whether it is ready")
    q.set_defaults(func=_models_list)

    q = msub.add_parser("install", help="pip-install a model's pinned packages, then convert it to the cache")
    q.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"models to install (default: all of {', '.join(models.REGISTRY)})",
    )
    q.add_argument("--force", action="store_true", help="reinstall packages and rebuild the cache")
    q.add_argument("--no-prepare", action="store_true", help="only pip-install, convert on first use")
    q.set_defaults(func=_models_install)

    q = msub.add_parser("prepare", help="assemble, verify and convert an installed model into the cache")
    q.add_argument("names", nargs="+", choices=list(models.REGISTRY), metavar="NAME")
    q.add_argument("--force", action="store_true", help="rebuild even if the cache looks valid")
    q.set_defaults(func=_models_prepare)

    q = msub.add_parser("path", help="print the converted safetensors directory of a model")
    q.add_argument("name", choices=list(models.REGISTRY), metavar="NAME")
    q.set_defaults(func=lambda a: print(models.ensure_model(a.name)))


def _models_list(args: argparse.Namespace) -> None:
    from rasd import models

    for spec in models.REGISTRY.values():
        print(f"{spec.name:<22} {spec.role:<7} {models.status(spec.name):<10} {spec.description}")
    print(f"cache: {models.model_dir(next(iter(models.REGISTRY))).parent}")


def _models_install(args: argparse.Namespace) -> None:
    from rasd import models

    names = args.names or list(models.REGISTRY)
    for name in names:
        models.get_spec(name)  # fail fast on a typo, before any download
    for name in names:
        out = models.install(name, force=args.force, prepare=not args.no_prepare)
        print(f"{name}: {out or 'installed'}")


def _models_prepare(args: argparse.Namespace) -> None:
    from rasd import models

    for name in args.names:
        print(f"{name}: {models.ensure_model(name, force=args.force)}")


def _add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="install and inspect the real data sets")
    dsub = p.add_subparsers(dest="data_cmd", required=True)
    q = dsub.add_parser("install", help="pip-install the pinned data-set packages (--no-deps, hash-checked)")
    q.set_defaults(func=lambda a: __import__("rasd.data").data.install())
    q = dsub.add_parser("list", help="count the records of every data set")
    q.set_defaults(func=_data_list)


def _data_list(args: argparse.Namespace) -> None:
    from rasd import data

    loaders = {
        "humaneval": lambda: len(data.humaneval()),
        "mtbench": lambda: len(data.mtbench()),
        "sharegpt": lambda: sum(1 for _ in data.sharegpt()),
        "wikipedia (en-us)": lambda: len(data.wikipedia()),
        "fanoutqa (dev)": lambda: len(data.fanoutqa()),
        "python_docs": lambda: len(data.python_docs()),
        "stdlib_code": lambda: sum(1 for _ in data.stdlib_code()),
    }
    for name, count in loaders.items():
        try:
            print(f"{name:<20} {count():>7} records")
        except AssetError as exc:
            print(f"{name:<20} missing: {exc}")


def _add_generate(sub: argparse._SubParsersAction) -> None:
    from rasd import models

    p = sub.add_parser(
        "generate",
        help="speculative generation (RASD) with any target, draft model and datastore",
        description="Prints the generated text (streamed) on stdout and the statistics on stderr.",
    )
    p.add_argument("prompt", help="prompt text (use --chat to wrap it in the model's chat template)")
    p.add_argument(
        "--model", default=models.DEFAULT_TARGET, help="target: registry name or local HF directory"
    )
    p.add_argument(
        "--draft",
        default=None,
        help="draft model with the target's tokenizer (registry name or directory), "
        f"e.g. {models.DEFAULT_DRAFT}",
    )
    p.add_argument(
        "--datastore",
        default=None,
        help="a datastore file, or a packaged corpus name (" + ", ".join(CORPORA) + ") built and cached on "
        "first use for a registry target",
    )
    p.add_argument("--no-prompt-lookup", action="store_true", help="do not retrieve from prompt and output")
    p.add_argument("--plain", action="store_true", help="plain decoding only (no speculation)")
    p.add_argument("--compare", action="store_true", help="also run plain HF generate; report speed-up")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--max-tree-nodes", type=int, default=64, help="upper bound on the verified tree size")
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="the models' dtype; on a CPU without native kernels for it the draft stays float32 (emulated "
        "16-bit forwards are slower than rasd's int8/bf16 kernels; the draft never changes the output)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(func=_generate)


def _load_any(name_or_path: str, dtype: str = "float32", device: str = "cpu"):
    """A registry model by name, or any local Hugging Face directory."""
    import torch

    from rasd import models

    torch_dtype = getattr(torch, dtype)
    if name_or_path in models.REGISTRY:
        return models.load_model(name_or_path, dtype=torch_dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not __import__("os").path.isdir(name_or_path):
        raise ValueError(
            f"unknown model {name_or_path!r}: use a registry name ({', '.join(models.REGISTRY)}) "
            "or a local Hugging Face model directory"
        )
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype).to(device).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _encode(tokenizer, prompt: str, chat: bool):
    if not prompt.strip():
        raise ValueError("the prompt is empty: pass some text to continue")
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: drop --chat")
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _resolve_datastore(spec: str | None, model_name: str):
    """A datastore path from --datastore: an existing file, or a packaged corpus name built on first use."""
    import os

    from rasd import models
    from rasd.datastore import ensure_datastore

    if spec is None or os.path.exists(spec):
        return spec
    corpora = spec.split("+")
    if all(c in CORPORA for c in corpora):
        if model_name not in models.REGISTRY:
            raise ValueError(
                f"--datastore {spec} builds a packaged corpus for registry models only: build one with "
                "`rasd datastore build --tokenizer DIR --out FILE ...` and pass the file"
            )
        return str(ensure_datastore(model_name, corpora))
    raise FileNotFoundError(
        f"datastore {spec} does not exist: pass a file from `rasd datastore build` "
        f"or one of {', '.join(CORPORA)}"
    )


def _print_stats(stats) -> None:
    sources = " ".join(f"{k}:{v}" for k, v in sorted(stats.accepted_by_source.items())) or "-"
    print(
        f"[{stats.new_tokens} tokens in {stats.time_total:.2f} s: {stats.tokens_per_second:.2f} tokens/s; "
        f"{stats.steps} target forwards, mean accepted length {stats.mean_accepted_length:.2f}; "
        f"accepted tokens by source {sources}; drafting {stats.time_draft:.2f} s, retrieval "
        f"{stats.time_retrieval:.2f} s, verification {stats.time_verify:.2f} s]",
        file=sys.stderr,
    )


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"--device {device}: {exc}; use cpu, cuda or cuda:N") from exc


def _generate(args: argparse.Namespace) -> None:
    import torch

    from rasd.generate import GenerationStats, SpeculativeGenerator

    if args.max_new_tokens < 0:
        raise ValueError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.max_tree_nodes < 0:
        raise ValueError(f"--max-tree-nodes must be >= 0, got {args.max_tree_nodes}")
    _check_device(args.device)
    datastore = _resolve_datastore(args.datastore, args.model)
    model, tokenizer = _load_any(args.model, args.dtype, args.device)
    draft = None
    if args.draft and not args.plain:
        from rasd.fastpath import emulated_on_this_cpu

        cpu = torch.device(args.device).type == "cpu"
        emulated = cpu and emulated_on_this_cpu(getattr(torch, args.dtype))
        draft, _ = _load_any(args.draft, "float32" if emulated else args.dtype, args.device)
    input_ids = _encode(tokenizer, args.prompt, args.chat).to(args.device)
    speculative = not args.plain
    gen = SpeculativeGenerator(
        model,
        draft=draft,
        datastore=datastore if speculative else None,
        prompt_lookup=speculative and not args.no_prompt_lookup,
        max_tree_nodes=args.max_tree_nodes,
        tokenizer=tokenizer,
    )
    kwargs = {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": args.do_sample,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "seed": args.seed,
        "stop_strings": args.stop,
    }
    stats = GenerationStats()
    pieces: list[int] = []
    printed = ""
    start = time.perf_counter()
    for chunk in gen.stream(input_ids[0], stats=stats, **kwargs):
        pieces.extend(chunk)
        text = tokenizer.decode(pieces, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for the next chunk
            continue
        sys.stdout.write(text[len(printed) :])
        sys.stdout.flush()
        printed = text
    elapsed = time.perf_counter() - start
    print()
    _print_stats(stats)
    if args.compare:
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
            )
            plain = time.perf_counter() - t0
        n = out.shape[1] - input_ids.shape[1]
        same = "identical" if out[0, input_ids.shape[1] :].tolist()[: len(pieces)] == pieces else "DIFFERENT"
        print(
            f"[plain HF generate: {n} tokens in {plain:.2f} s; speed-up {plain / elapsed:.2f}x; "
            f"output {same if not args.do_sample else 'not compared (sampling)'}]",
            file=sys.stderr,
        )


def _add_demo(sub: argparse._SubParsersAction) -> None:
    from rasd import models

    p = sub.add_parser(
        "demo",
        help="the main job: plain decoding vs RASD on real prompts with the packaged Qwen2.5-Coder pair",
    )
    p.add_argument("--prompts", type=int, default=3, help="how many HumanEval prompts (test split) to run")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--model", default=models.DEFAULT_TARGET, choices=list(models.REGISTRY))
    p.add_argument("--draft", default=models.DEFAULT_DRAFT, choices=list(models.REGISTRY))
    p.add_argument("--show", action="store_true", help="print each completion")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    import torch

    from rasd import models, tasks
    from rasd.datastore import ensure_datastore
    from rasd.generate import GenerationStats, SpeculativeGenerator

    print(f"loading {args.model} (target) and {args.draft} (draft) ...", flush=True)
    target, tokenizer = models.load_model(args.model)
    draft, _ = models.load_model(args.draft)
    store = ensure_datastore(args.model, ("stdlib",))
    print(
        "preparing the fast path and measuring the verification cost curve (cached per machine) ...",
        flush=True,
    )
    gen = SpeculativeGenerator(target, draft=draft, datastore=store, prompt_lookup=True, tokenizer=tokenizer)
    prompts = tasks.prompts("code", "test", args.prompts)
    gen.generate(tasks.prompts("code", "dev", 1)[0].render(tokenizer), max_new_tokens=8)  # warm-up
    plain_time = spec_time = 0.0
    total = GenerationStats()
    identical = 0
    print(
        f"{'prompt':<18} {'tokens':>6} {'plain s':>8} {'rasd s':>8} {'speed-up':>8} {'acc.len':>7}  identical"
    )
    for prompt in prompts:
        ids = torch.tensor([prompt.render(tokenizer)])
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = target.generate(
                ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens, do_sample=False
            )
            t_plain = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = gen.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        t_spec = time.perf_counter() - t0
        plain_new = out[0, ids.shape[1] :].tolist()
        spec_new = res.sequences[0, ids.shape[1] :].tolist()[: res.stats.new_tokens]
        same = plain_new[: len(spec_new)] == spec_new and len(spec_new) == len(plain_new)
        identical += same
        plain_time += t_plain
        spec_time += t_spec
        total.merge(res.stats)
        print(
            f"{prompt.id:<18} {len(spec_new):>6} {t_plain:>8.2f} {t_spec:>8.2f} {t_plain / t_spec:>7.2f}x "
            f"{res.stats.mean_accepted_length:>7.2f}  {'yes' if same else 'NO'}",
            flush=True,
        )
        if args.show:
            print(tokenizer.decode(spec_new, skip_special_tokens=True))
    sources = ", ".join(f"{k} {v}" for k, v in sorted(total.accepted_by_source.items())) or "none"
    print(
        f"\nRASD ({args.model} + {args.draft} draft + stdlib datastore + prompt lookup), CPU fp32:\n"
        f"  speed-up over plain HF generate: {plain_time / spec_time:.2f}x "
        f"({total.new_tokens / spec_time:.2f} vs {total.new_tokens / plain_time:.2f} tokens/s)\n"
        f"  mean accepted length: {total.mean_accepted_length:.2f} tokens per target forward\n"
        f"  accepted tokens per source: {sources}\n"
        f"  token-identical to plain greedy decoding: {identical}/{len(prompts)} prompts"
    )
    if identical != len(prompts):
        raise SystemExit("rasd demo: speculative output differed from plain decoding (a bug: please report)")


_TEXT_EXTENSIONS = (
    ".py,.pyi,.txt,.md,.rst,.c,.h,.cc,.cpp,.hpp,.java,.js,.ts,.go,.rs,.sh,.toml,.yaml,.yml,.json"
)


def _add_datastore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datastore", help="build and inspect suffix-automaton datastores")
    dsub = p.add_subparsers(dest="datastore_cmd", required=True)
    q = dsub.add_parser("build", help="tokenize text/code/JSONL and write a datastore file")
    q.add_argument("inputs", nargs="*", help="text or code files, .jsonl files, or directories (recursive)")
    q.add_argument("--tokenizer", required=True, help="registry model name or local Hugging Face directory")
    q.add_argument("--out", required=True, help="output file (written atomically)")
    q.add_argument(
        "--dataset",
        action="append",
        default=[],
        choices=CORPORA,
        help="also add a packaged data set (repeatable)",
    )
    q.add_argument(
        "--jsonl-field",
        action="append",
        default=[],
        help="JSONL field(s) holding the text (default: text, content, value)",
    )
    q.add_argument("--ext", default=_TEXT_EXTENSIONS, help="file extensions taken from directories")
    q.add_argument(
        "--exclude",
        action="append",
        default=["site-packages", "__pycache__", ".git"],
        help="skip paths containing this component (repeatable)",
    )
    q.add_argument("--max-documents", type=int, default=None)
    q.add_argument(
        "--shards",
        type=int,
        default=None,
        help="split by document into N shard files beside --out, which becomes their JSON manifest "
        "(serve it with rasd.sharded.ShardedDatastore on Ray)",
    )
    q.set_defaults(func=_datastore_build)
    q = dsub.add_parser("info", help="print a datastore file's header and sizes")
    q.add_argument("path")
    q.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    q.set_defaults(func=_datastore_info)
    q = dsub.add_parser(
        "verify", help="check a datastore file completely: every state, edge and checksum (progress bar)"
    )
    q.add_argument("path")
    q.set_defaults(func=_datastore_verify)


def _load_tokenizer(name_or_path: str):
    import os

    from rasd import models

    if name_or_path in models.REGISTRY:
        return models.load_tokenizer(name_or_path)
    if not os.path.isdir(name_or_path):
        raise ValueError(
            f"unknown tokenizer {name_or_path!r}: use a registry name ({', '.join(models.REGISTRY)}) "
            "or a local Hugging Face model directory"
        )
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _check_writable(out: str) -> None:
    """The output's directory must exist and be writable (checked before minutes of tokenizing)."""
    import os

    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ValueError(f"--out {out}: directory {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: directory {parent} is not writable; choose another --out")
    if os.path.isdir(out):
        raise ValueError(
            f"--out {out} is a directory; give a file name such as {out.rstrip('/')}/corpus.rasd"
        )


def _iter_documents(args: argparse.Namespace):
    """(name, text) for every input document."""
    import json
    from pathlib import Path

    exts = {e if e.startswith(".") else f".{e}" for e in args.ext.split(",") if e}
    fields = args.jsonl_field or ["text", "content", "value"]

    def from_file(path: Path):
        if path.suffix == ".jsonl":
            with open(path, encoding="utf-8", errors="replace") as fh:
                for n, line in enumerate(fh):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    text = next((record[f] for f in fields if isinstance(record.get(f), str)), None)
                    if text is None:
                        raise ValueError(
                            f"{path}:{n + 1} has none of the fields {fields}; pass --jsonl-field"
                        )
                    yield f"{path}:{n + 1}", text
        else:
            yield str(path), path.read_text(encoding="utf-8", errors="replace")

    for item in args.inputs:
        path = Path(item)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.is_file() and f.suffix in exts and not set(args.exclude) & set(f.parts):
                    yield from from_file(f)
        elif path.is_file():
            yield from from_file(path)
        else:
            raise FileNotFoundError(f"input {item} does not exist")
    for name in args.dataset:
        yield from corpus_documents(name)


def _datastore_build(args: argparse.Namespace) -> None:
    import itertools

    from rasd.datastore import build_datastore

    _check_writable(args.out)
    tokenizer = _load_tokenizer(args.tokenizer)
    start = time.perf_counter()
    documents = itertools.islice(_iter_documents(args), args.max_documents)
    if args.shards is not None:
        from rasd.sharded import Manifest, build_sharded_datastore

        shards = Manifest.load(build_sharded_datastore(documents, tokenizer, args.out, args.shards)).shards
        elapsed = time.perf_counter() - start
        print(
            f"{args.out}: manifest of {len(shards)} shards, {sum(s.tokens for s in shards)} tokens in "
            f"{sum(s.documents for s in shards)} documents, {elapsed:.1f} s"
        )
        return
    store = build_datastore(documents, tokenizer, args.out)
    elapsed = time.perf_counter() - start
    print(f"{args.out}: {len(store)} tokens in {store.num_documents} documents, {elapsed:.1f} s")


def _datastore_verify(args: argparse.Namespace) -> None:
    from rasd.datastore import Datastore

    start = time.perf_counter()
    store = Datastore.load(args.path, verify=False)
    store.check_integrity(progress=sys.stderr.isatty())
    info = store.info()
    print(
        f"{args.path}: OK ({info['states']} states, {info['edges']} edges, {info['file_bytes']} bytes, "
        f"checked in {time.perf_counter() - start:.2f} s)"
    )


def _datastore_info(args: argparse.Namespace) -> None:
    from rasd.datastore import Datastore

    for key, value in Datastore.load(args.path, verify=not args.no_verify).info().items():
        print(f"{key:<16} {value}")


def _add_ralm(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("ralm", help="RaLMSpec knowledge bases: build and inspect retrieval indexes")
    rsub = p.add_subparsers(dest="ralm_cmd", required=True)
    ip = rsub.add_parser("index", help="build and inspect retrieval indexes")
    isub = ip.add_subparsers(dest="index_cmd", required=True)
    q = isub.add_parser(
        "build",
        help="split packaged corpora into ~100-word passages and index them",
        description="Kinds: flat (exact dense, faiss IndexFlatIP over all-MiniLM-L6-v2), hnsw / ivf "
        "(approximate dense), bm25 (sparse, bm25s), knnlm (hidden state -> next token entries of --model "
        "over the same passages, L2; built straight to disk and resumable: rerun the same command after an "
        "interruption).",
    )
    q.add_argument("--kind", required=True, choices=("flat", "hnsw", "ivf", "bm25", "knnlm"))
    q.add_argument("--out", required=True, help="output directory")
    q.add_argument(
        "--sources",
        default="wikipedia-en,wikipedia-es,wikipedia-fr,python-docs",
        help="comma-separated packaged corpora (wikipedia-en, wikipedia-es, wikipedia-fr, python-docs)",
    )
    q.add_argument("--limit", type=int, default=None, help="keep the first N passages (corpus size)")
    q.add_argument("--words", type=int, default=100, help="words per passage")
    q.add_argument("--hnsw-m", type=int, default=32)
    q.add_argument("--ef-search", type=int, default=64)
    q.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4 sqrt(N))")
    q.add_argument("--nprobe", type=int, default=8)
    q.add_argument("--model", default="smollm2-135m", help="knnlm: the LM whose hidden states are keys")
    q.add_argument("--max-entries", type=int, default=None, help="knnlm: cap on datastore entries")
    q.add_argument(
        "--knn-index",
        default="exact",
        choices=("exact", "flat", "hnsw", "ivf"),
        help="knnlm: exact (rasd's batched exact search), flat (faiss exact), hnsw or ivf (faiss, "
        "approximate)",
    )
    q.set_defaults(func=_ralm_index_build)
    q = isub.add_parser("info", help="print an index directory's metadata")
    q.add_argument("path")
    q.set_defaults(func=_ralm_index_info)


def _ralm_index_build(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rasd.ralmspec import BM25Retriever, DenseRetriever, KNNDatastore, passages

    out = Path(args.out)
    resuming = args.kind == "knnlm" and (out / "build.json").exists()
    if out.exists() and any(out.iterdir()) and not resuming:
        raise ValueError(f"{out} exists and is not empty: choose a new --out directory")
    sources = [s for s in args.sources.split(",") if s]
    start = time.perf_counter()
    ps = passages(sources, words=args.words, limit=args.limit)
    if not ps:
        raise ValueError(f"no passages in {sources}")
    print(f"{len(ps)} passages from {', '.join(sources)}", file=sys.stderr)
    if args.kind == "bm25":
        index = BM25Retriever.build(ps)
        size = f"{len(index)} passages"
    elif args.kind == "knnlm":
        model, tokenizer = _load_any(args.model)
        index = KNNDatastore.build_into(
            out,
            model,
            tokenizer,
            ps,
            max_entries=args.max_entries,
            progress=True,
            index_kind=args.knn_index,
            hnsw_m=args.hnsw_m,
        )
        size = f"{len(index)} entries (dim {index.dim})"
        print(f"{out}: knnlm index, {size}, {time.perf_counter() - start:.1f} s")
        return
    else:
        index = DenseRetriever.build(
            ps,
            progress=True,
            kind=args.kind,
            hnsw_m=args.hnsw_m,
            ef_search=args.ef_search,
            nlist=args.nlist,
            nprobe=args.nprobe,
            device="cpu",
        )
        size = f"{len(index)} passages"
    index.save(out)
    print(f"{out}: {args.kind} index, {size}, {time.perf_counter() - start:.1f} s")


def _ralm_index_info(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    meta_path = Path(args.path) / "meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{args.path} is not a rasd retrieval index ({exc})") from exc
    for key, value in meta.items():
        print(f"{key:<16} {value}")


def _add_calibrate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="measure a model's forward cost on this machine ahead of time (cached; else the first use does)",
        description="Times whole forwards of 1-64 tokens on every path rasd may run them on (plain torch, "
        "the native kernel, torch bf16 for drafts) and caches the curves in $RASD_CACHE/costmodel, keyed by "
        "the architecture and the machine, so the first generate() does not pay for it.",
    )
    p.add_argument("model", help="registry name or local Hugging Face directory")
    p.add_argument("--as-draft", action="store_true", help="measure the paths offered to drafts instead")
    p.add_argument(
        "--draft-weights",
        choices=["bf16", "int8", "fp32"],
        default=None,
        help="with --as-draft: the draft weight copy to measure (default: DraftTreeConfig's)",
    )
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_calibrate)


def _calibrate(args: argparse.Namespace) -> None:
    from rasd.costmodel import forward_plan
    from rasd.fastpath import FastPath, FastPathConfig

    model, _ = _load_any(args.model, "float32", args.device)
    start = time.perf_counter()
    paths = []
    if args.device == "cpu":
        if args.as_draft:
            from rasd.drafting.draft_model import DraftTreeConfig, draft_fast_paths

            config = DraftTreeConfig()
            if args.draft_weights:
                config = dataclasses.replace(config, weights=args.draft_weights)
            paths = draft_fast_paths(model, config)
        else:
            paths = [FastPath.for_model(model, FastPathConfig())]
    plan = forward_plan(model, paths, threads=1 if paths else None, quick=False, refresh=True)
    profile = plan.profile()
    names = plan.names(list(profile))
    base = profile[min(profile)]
    print(f"{'tokens':>6}  {'seconds':>8}  {'T(n)/T(1)':>9}  path")
    for n, seconds in profile.items():
        print(f"{n:>6}  {seconds:>8.4f}  {seconds / base:>9.2f}  {names[n]}")
    print(f"measured in {time.perf_counter() - start:.1f} s; cached for this machine", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rasd", description="Lossless speculative decoding for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"rasd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_generate, _add_calibrate, _add_datastore, _add_ralm, _add_models, _add_data):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (AssetError, ValueError, OSError, RuntimeError) as exc:
        # One line naming the problem and its fix; RASD_DEBUG=1 shows the traceback instead.
        if os.environ.get("RASD_DEBUG"):
            raise
        print(f"rasd: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
