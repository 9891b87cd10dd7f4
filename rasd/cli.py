"""The ``rasd`` command line. Each command group has an ``_add_<group>`` function that declares its
arguments and a handler; handlers import heavy modules (torch, transformers) lazily so that
``rasd --help`` stays instant."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rasd import __version__
from rasd._assets import AssetError


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

    p = sub.add_parser("generate", help="generate text with a packaged or local model")
    p.add_argument("prompt", help="prompt text (use --chat to wrap it in the model's chat template)")
    p.add_argument("--model", default=models.DEFAULT_TARGET, help="registry name or local HF directory")
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=_generate)


def _load_any(name_or_path: str):
    """A registry model by name, or any local Hugging Face directory."""
    from rasd import models

    if name_or_path in models.REGISTRY:
        return models.load_model(name_or_path)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(name_or_path)


def _encode(tokenizer, prompt: str, chat: bool):
    if chat:
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            add_generation_prompt=True,
            return_tensors="pt",
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt, return_tensors="pt").input_ids


def _generate(args: argparse.Namespace) -> None:
    import torch

    model, tokenizer = _load_any(args.model)
    input_ids = _encode(tokenizer, args.prompt, args.chat)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    elapsed = time.perf_counter() - start
    new = out[0, input_ids.shape[1] :]
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"\n[{len(new)} tokens in {elapsed:.2f} s: {len(new) / elapsed:.2f} tokens/s]", file=sys.stderr)


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the main job: generation on real prompts with the packaged models")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--prompts", type=int, default=2, help="how many HumanEval prompts to run")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> None:
    import torch

    from rasd import data, models

    model, tokenizer = models.load_model(models.DEFAULT_TARGET)
    total_tokens, total_time = 0, 0.0
    for problem in data.humaneval()[: args.prompts]:
        input_ids = tokenizer(problem.prompt, return_tensors="pt").input_ids
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids, max_new_tokens=args.max_new_tokens, do_sample=False)
        total_time += time.perf_counter() - start
        total_tokens += out.shape[1] - input_ids.shape[1]
        text = tokenizer.decode(out[0, input_ids.shape[1] :], skip_special_tokens=True)
        print(f"--- {problem.task_id}\n{text}")
    print(f"plain greedy decoding: {total_tokens} tokens, {total_tokens / total_time:.2f} tokens/s")


_DATASETS = ("stdlib", "python-docs", "sharegpt", "wikipedia")
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
        choices=_DATASETS,
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
    q.set_defaults(func=_datastore_build)
    q = dsub.add_parser("info", help="print a datastore file's header and sizes")
    q.add_argument("path")
    q.add_argument("--no-verify", action="store_true", help="skip the checksum pass")
    q.set_defaults(func=_datastore_info)


def _load_tokenizer(name_or_path: str):
    from rasd import models

    if name_or_path in models.REGISTRY:
        return models.load_tokenizer(name_or_path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_path)


def _iter_documents(args: argparse.Namespace):
    """(name, text) for every input document."""
    import json
    from pathlib import Path

    from rasd import data

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
    loaders = {
        "stdlib": lambda: ((d.id, d.text) for d in data.stdlib_code()),
        "python-docs": lambda: ((d.id, d.text) for d in data.python_docs()),
        "sharegpt": lambda: ((c.id, "\n".join(t for _, t in c.messages)) for c in data.sharegpt()),
        "wikipedia": lambda: ((d.id, d.text) for d in data.wikipedia()),
    }
    for name in args.dataset:
        yield from loaders[name]()


def _datastore_build(args: argparse.Namespace) -> None:
    import itertools

    from tqdm.auto import tqdm

    from rasd.datastore import Datastore

    tokenizer = _load_tokenizer(args.tokenizer)
    store = Datastore(vocab_size=len(tokenizer))
    start = time.perf_counter()
    docs = itertools.islice(_iter_documents(args), args.max_documents)
    bar = tqdm(desc="tokenize + build", unit="doc")
    while batch := list(itertools.islice(docs, 256)):
        for ids in tokenizer([text for _, text in batch], add_special_tokens=False)["input_ids"]:
            if ids:
                store.add(ids)
        bar.update(len(batch))
        bar.set_postfix(tokens=len(store))
    bar.close()
    if not len(store):
        raise ValueError("no text found in the inputs")
    store.save(args.out, tokenizer=tokenizer)
    elapsed = time.perf_counter() - start
    print(f"{args.out}: {len(store)} tokens in {store.num_documents} documents, {elapsed:.1f} s")


def _datastore_info(args: argparse.Namespace) -> None:
    from rasd.datastore import Datastore

    for key, value in Datastore.load(args.path, verify=not args.no_verify).info().items():
        print(f"{key:<16} {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rasd", description="Lossless speculative decoding for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"rasd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_generate, _add_datastore, _add_models, _add_data):
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (AssetError, ValueError, FileNotFoundError) as exc:
        print(f"rasd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
