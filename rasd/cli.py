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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rasd", description="Lossless speculative decoding for Hugging Face causal LMs."
    )
    parser.add_argument("--version", action="version", version=f"rasd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_generate, _add_models, _add_data):
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
