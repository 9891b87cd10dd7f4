"""First use on a machine that has never measured the model: is the first ``generate()`` slower than HF's?

    python -m benchmarks.bench_first_call                      # Qwen 1.5B target + 0.5B draft, 64 tokens

rasd measures the forward paths of a model once per machine (cached in ``$RASD_CACHE/costmodel``). This
benchmark runs with an empty, temporary cost-model cache, so the first call pays the whole calibration, and
reports per prompt: HF ``generate`` time, rasd's first call (construction + calibration + generation), the
same call again (warm), and the calibration's share. Prompts are held-out test prompts (code, chat, docqa);
the order of HF and rasd alternates per prompt. Every output is checked token-identical to HF's.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from typing import Any

import torch

from benchmarks.harness import command_line, ratio, write_results
from rasd import models, tasks
from rasd.datastore import Datastore, ensure_datastore

COLUMNS = (
    "prompt",
    "prompt tokens",
    "HF s",
    "rasd first s",
    "rasd warm s",
    "first vs HF",
    "warm vs HF",
    "identical",
)


def _hf(model, ids: list[int], max_new: int) -> tuple[list[int], float]:
    x = torch.tensor([ids])
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids) :].tolist(), time.perf_counter() - start


def _fresh_costmodel_cache(root: str) -> None:
    """Point $RASD_CACHE at ``root``: the real cache's models and datastores linked in, no cost curves."""
    from rasd._assets import cache_dir

    real = cache_dir()
    for entry in real.iterdir() if real.exists() else ():
        if entry.name != "costmodel":
            os.symlink(entry, os.path.join(root, entry.name))
    os.environ["RASD_CACHE"] = root


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--families", default="code,chat,docqa")
    parser.add_argument("--name", default="first_call")
    args = parser.parse_args(argv)
    from rasd import costmodel, fastpath
    from rasd.generate import SpeculativeGenerator

    target, tok = models.load_model(models.DEFAULT_TARGET)
    draft, _ = models.load_model(models.DEFAULT_DRAFT)
    store = Datastore.load(ensure_datastore(models.DEFAULT_TARGET, ["stdlib"]), tokenizer=tok)
    rows: list[dict[str, Any]] = []
    for i, family in enumerate(args.families.split(",")):
        prompt = tasks.prompts(family, "test", 1)[0]
        ids = prompt.render(tok)
        with tempfile.TemporaryDirectory() as root:
            _fresh_costmodel_cache(root)
            # Nothing kept in memory either (plans, prepared fast-path weights): a new process's first call.
            costmodel._plans.clear()
            fastpath._shared.clear()
            fastpath._bf16_copies.clear()
            result: dict[str, Any] = {}
            for who in ["hf", "rasd"] if i % 2 == 0 else ["rasd", "hf"]:
                if who == "hf":
                    result["hf"] = _hf(target, ids, args.max_new_tokens)
                    continue
                start = time.perf_counter()
                gen = SpeculativeGenerator(target, draft=draft, datastore=store, tokenizer=tok)
                built = time.perf_counter() - start
                first = gen.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                result["first"] = (first, time.perf_counter() - start, built)
                start = time.perf_counter()
                warm = gen.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
                result["warm"] = (warm, time.perf_counter() - start)
        ref, hf_s = result["hf"]
        first, first_s, built = result["first"]
        warm, warm_s = result["warm"]
        same = all(r.sequences[0, len(ids) : len(ids) + len(ref)].tolist() == ref for r in (first, warm))
        rows.append(
            {
                "prompt": prompt.id,
                "prompt tokens": len(ids),
                "HF s": hf_s,
                "rasd first s": first_s,
                "construction + calibration s": built,
                "rasd warm s": warm_s,
                "first vs HF": ratio(hf_s, first_s),
                "warm vs HF": ratio(hf_s, warm_s),
                "identical": same,
            }
        )
        print(rows[-1], flush=True)
    write_results(
        args.name,
        {"rows": rows, "max_new_tokens": args.max_new_tokens},
        rows,
        columns=COLUMNS,
        title=f"First call on an unmeasured machine ({args.max_new_tokens} new tokens)",
        command=command_line("benchmarks.bench_first_call", argv),
    )


if __name__ == "__main__":
    main()
