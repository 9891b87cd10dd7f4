"""Verification cost: the target's forward time for n fed tokens, stock transformers vs rasd's CPU fast path.

    python -m benchmarks.bench_verify                      # both Qwen models, context 512
    python -m benchmarks.bench_verify --models qwen2.5-coder-0.5b --repeats 5

For each model (loaded one at a time) and each tree size n (tokens fed: the root plus n - 1 tree nodes),
one verification forward after a prefilled context is timed with the stock path and with the fast path
(:mod:`rasd.fastpath`), the two interleaved round by round (and the sizes round-robin within a round, see
:func:`rasd.profile_verify`); medians over all rounds. Reported: median seconds, T(n)/T(1) within each
path (what decides whether speculation can pay) and the speed-up of the fast path at each n. A single
1536 -> 8960 linear layer (the 1.5B MLP up-projection) is timed too, F.linear vs the native kernel.
"""

from __future__ import annotations

import argparse
import gc
import statistics
from typing import Any

import torch

from benchmarks.harness import (
    RESULTS_DIR,
    Summary,
    command_line,
    interleave,
    label_axes,
    save_figure,
    write_results,
)
from rasd import models
from rasd.costmodel import profile_verify
from rasd.fastpath import FastPath

SIZES = (1, 2, 4, 8, 16, 32, 64)


def interleaved_curves(
    model: torch.nn.Module, paths: dict[str, Any], sizes: tuple[int, ...], context: int, repeats: int
) -> dict[str, dict[int, list[float]]]:
    """Per path name and size, one verification time per round (each round's median of 2): ``repeats``
    rounds, the paths (``profile_verify``'s ``fast_path`` values) in an order rotated round by round."""
    times: dict[str, dict[int, list[float]]] = {p: {n: [] for n in sizes} for p in paths}
    names = list(paths)
    for r in range(repeats):
        k = r % len(names)
        for path in names[k:] + names[:k]:
            curve = profile_verify(model, sizes, context, repeats=2, fast_path=paths[path], seed=r)
            for n, t in curve.items():
                times[path][n].append(t)
    return times


def model_curves(name: str, sizes: tuple[int, ...], context: int, repeats: int) -> list[dict[str, Any]]:
    model, _ = models.load_model(name)
    fast = FastPath.for_model(model)
    times = interleaved_curves(model, {"stock": False, "fast": fast}, sizes, context, repeats)
    rows = []
    for n in sizes:
        stock, fastp = Summary.of(times["stock"][n]), Summary.of(times["fast"][n])
        rows.append(
            {
                "model": name,
                "n": n,
                "stock s": stock.median,
                "fast s": fastp.median,
                "stock T(n)/T(1)": stock.median / statistics.median(times["stock"][1]),
                "fast T(n)/T(1)": fastp.median / statistics.median(times["fast"][1]),
                "fast-path speed-up": stock.median / fastp.median,
                "stock spread": [stock.min, stock.max],
                "fast spread": [fastp.min, fastp.max],
            }
        )
    del model, fast
    gc.collect()
    return rows


def linear_layer(rows_list: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    """One 1536 -> 8960 linear layer: F.linear vs the fast path's kernel, per number of rows."""
    layer = torch.nn.Linear(1536, 8960, bias=False)
    holder = torch.nn.Sequential(layer)
    fast = FastPath.for_model(holder)
    out = []
    for rows in rows_list:
        x = torch.randn(1, rows, 1536)
        with torch.inference_mode():

            def stock(x: torch.Tensor = x) -> None:
                torch.nn.functional.linear(x, layer.weight)

            def ours(x: torch.Tensor = x) -> None:
                with fast.active():
                    layer(x)

            times = interleave({"F.linear": stock, "rasd": ours}, repeats=repeats * 10, warmup=3)
        out.append(
            {
                "rows": rows,
                "F.linear ms": 1e3 * statistics.median(times["F.linear"]),
                "rasd ms": 1e3 * statistics.median(times["rasd"]),
                "speed-up": statistics.median(times["F.linear"]) / statistics.median(times["rasd"]),
            }
        )
    return out


def plot(rows: list[dict[str, Any]], name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        ns = [r["n"] for r in mine]
        ax.plot(ns, [r["stock T(n)/T(1)"] for r in mine], "o--", label=f"{model} stock")
        ax.plot(ns, [r["fast T(n)/T(1)"] for r in mine], "o-", label=f"{model} rasd fast path")
    ax.set_xscale("log", base=2)
    label_axes(
        ax, "tokens verified in one forward (n)", "T(n) / T(1)", "Verification cost vs tree size (fp32, CPU)"
    )
    save_figure(fig, name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default=f"{models.DEFAULT_DRAFT},{models.DEFAULT_TARGET}")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--name", default="verify")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    sizes = tuple(int(s) for s in args.sizes.split(","))
    rows = [
        row
        for name in args.models.split(",")
        for row in model_curves(name, sizes, args.context, args.repeats)
    ]
    layer = linear_layer((1, 2, 4, 8, 16), args.repeats)
    write_results(
        args.name,
        {"context": args.context, "repeats": args.repeats, "rows": rows, "linear_1536x8960": layer},
        rows,
        columns=[
            "model",
            "n",
            "stock s",
            "fast s",
            "stock T(n)/T(1)",
            "fast T(n)/T(1)",
            "fast-path speed-up",
        ],
        title=f"Verification forward time vs tree size (context {args.context}, fp32, CPU, median of "
        f"{2 * args.repeats})",
        command=command_line("benchmarks.bench_verify", argv),
    )
    md = RESULTS_DIR / f"{args.name}.md"
    from benchmarks.harness import markdown_table

    md.write_text(md.read_text() + "\n### One 1536 -> 8960 linear layer\n\n" + markdown_table(layer) + "\n")
    plot(rows, args.name)
    print(md.read_text())


if __name__ == "__main__":
    main()
