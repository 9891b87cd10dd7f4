"""The one small harness every benchmark shares.

- Contenders are **interleaved** round-robin in one process (:func:`interleave`), so that slow drift of a
  noisy machine hits all of them alike and their *ratios* hold.
- Warm-up runs are discarded; statistics are medians with the spread (min, max, inter-quartile range).
- Every result file records the exact versions and hardware (:func:`environment`).
- Results are written as JSON (the source of truth) and a Markdown table (:func:`write_results`).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).with_name("results")


@dataclass(frozen=True)
class Summary:
    """Order statistics of repeated measurements."""

    n: int
    median: float
    mean: float
    min: float
    max: float
    q1: float
    q3: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            raise ValueError("no measurements to summarize")
        vals = sorted(float(v) for v in values)
        if len(vals) == 1:
            q1 = q3 = vals[0]
        else:
            q1, _, q3 = statistics.quantiles(vals, n=4, method="inclusive")
        return cls(len(vals), statistics.median(vals), statistics.fmean(vals), vals[0], vals[-1], q1, q3)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def ratio(baseline: float, value: float) -> float:
    """Speed-up of ``value`` over ``baseline`` when both are durations (baseline / value)."""
    if value <= 0:
        raise ValueError("durations must be positive")
    return baseline / value


def mean_accepted_length(tokens_per_step: Sequence[int]) -> float:
    """Mean number of tokens committed per target forward pass (accepted drafts + the bonus token)."""
    if not tokens_per_step:
        raise ValueError("no steps")
    return sum(tokens_per_step) / len(tokens_per_step)


def interleave(
    contenders: Mapping[str, Callable[[], Any]], *, repeats: int = 3, warmup: int = 1
) -> dict[str, list[float]]:
    """Run each contender ``warmup`` times, then ``repeats`` rounds of all contenders in turn.

    The order rotates every round so no contender always runs first. Returns wall seconds per run.
    """
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            start = time.perf_counter()
            contenders[name]()
            times[name].append(time.perf_counter() - start)
    return times


def environment() -> dict[str, Any]:
    """Versions and hardware, recorded in every result file."""
    import numpy as np

    from rasd.costmodel import cpu_name

    env: dict[str, Any] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "numpy": np.__version__,
    }
    try:
        import torch

        env["torch"] = torch.__version__
        env["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    try:
        import transformers

        env["transformers"] = transformers.__version__
    except ImportError:
        pass
    import rasd

    env["rasd"] = rasd.__version__
    try:
        env["git_commit"] = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        env["git_commit"] = None
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        env["memory_gb"] = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return env


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub Markdown table; floats get 3 significant decimals."""
    if not rows:
        return ""
    columns = list(columns or rows[0].keys())

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_results(
    name: str,
    payload: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    *,
    columns: Sequence[str] | None = None,
    title: str | None = None,
    out_dir: Path | None = None,
    command: str | None = None,
    env: Mapping[str, Any] | None = None,
) -> tuple[Path, Path]:
    """Write ``<name>.json`` (payload + environment + the command that produced it) and ``<name>.md``
    (a table of ``rows``). ``command``: see :func:`command_line`; RESULTS.md prints it under each section so
    a run with overridden arguments is never mistaken for a profile's defaults. ``env``: the environment
    of the run that produced the payload when rewriting an old result (default: this process's).
    """
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    env = dict(env) if env is not None else environment()
    json_path = out_dir / f"{name}.json"
    head: dict[str, Any] = {"environment": env}
    if command is not None:
        head["command"] = command
    json_path.write_text(json.dumps({**head, **payload}, indent=1, default=_jsonable) + "\n")
    md_path = out_dir / f"{name}.md"
    header = f"## {title or name}\n\n"
    footer = (
        f"\n{env['cpu']}, {env['cores']} cores, torch {env.get('torch')}, "
        f"rasd {env['rasd']} ({env['git_commit']})\n"
    )
    md_path.write_text(header + markdown_table(rows, columns) + footer)
    return json_path, md_path


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reproduces a run: ``python -m <module> <args>`` (``argv`` None: sys.argv)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join(["python", "-m", module, *(shlex.quote(a) for a in args)])


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serializable: {type(obj)}")


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    """The labels, light grid and small legend every benchmark plot uses."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def save_figure(fig: Any, name: str, out_dir: Path | None = None) -> Path:
    """Lay out ``fig``, write it as ``<name>.png`` next to the JSON results, and close it."""
    import matplotlib.pyplot as plt

    path = (out_dir or RESULTS_DIR) / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
