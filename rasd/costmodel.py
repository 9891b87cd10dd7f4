"""Measured cost of a model's forward pass as a function of the tokens fed, and the forward plan built on it.

``profile_verify`` times the project's own verification path (:class:`rasd.verify.TargetSession`) on a real
KV cache of the requested context length, on one forward path (plain torch or a :class:`FastPath`).
:class:`CostCurve` turns the measurements into a cost for any token count. :func:`forward_plan` measures
every candidate path of a model once per machine (cached in ``$RASD_CACHE/costmodel``) and returns the
:class:`rasd.fastpath.ForwardPlan` that picks the cheapest path per forward size; the budget planner prices
trees with the plan's curve.

Cache keys name what a measurement depends on (the architecture's shape, dtype, device, CPU, kernel, thread
counts, library versions), never the directory a model was loaded from, so the same model loaded from
another path reuses the measurement. On a miss rasd logs one line and runs a short calibration (a few
forwards per path, seconds); ``rasd calibrate MODEL`` runs the full one ahead of time.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import platform
import statistics
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rasd import __version__, _core
from rasd._assets import write_json_atomic
from rasd.fastpath import KERNEL_REVISION, FastPath, ForwardPlan, allow_grouped_sdpa
from rasd.lean import lean_applies
from rasd.tree import TokenTree
from rasd.verify import TargetSession

log = logging.getLogger("rasd")

DEFAULT_TREE_SIZES = (1, 2, 4, 8, 16, 32)
# A short calibration on first use: the sizes whose cost shapes the planner's choices (1 = a plain decode
# step, 4-16 = the trees it usually keeps); 2 and 32 are interpolated / extrapolated. One timed round at a
# short context: the cost of a small forward is dominated by streaming the weights, which the context
# length barely changes (the planner rescales online by measured / predicted step time anyway).
QUICK_SIZES = (1, 4, 8, 16)
QUICK_CONTEXT = 64
# Up to 5 rounds, fewer once 1.5 s are spent: a 1.5B's forwards take 0.3-1 s, so one round is stable there,
# while a small model's millisecond forwards need the median of several against scheduling noise.
QUICK_REPEATS, QUICK_BUDGET_SECONDS = 5, 1.5
FULL_CONTEXT = 256
# Config fields that name or document a checkpoint but do not change the cost of a forward.
_NOT_SHAPE = {
    "_name_or_path",
    "name_or_path",
    "_commit_hash",
    "transformers_version",
    "architectures",
    "id2label",
    "label2id",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "torch_dtype",
    "dtype",
    "_attn_implementation_autoset",
    "quantization_config",
}
_plans: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def profile_verify(
    model: torch.nn.Module,
    tree_sizes: Iterable[int] = DEFAULT_TREE_SIZES,
    context_length: int = FULL_CONTEXT,
    *,
    repeats: int = 3,
    fast_path: bool | FastPath | str = "auto",
    threads: int | str | None = "auto",
    seed: int = 0,
    budget_seconds: float | None = None,
) -> dict[int, float]:
    """Median seconds of one verification forward per tree size, on one forward path.

    ``tree_sizes`` count the tokens fed to the target (the root plus tree nodes), so size 1 is a plain
    decode step. Random chains of tokens are verified after a prefilled context of ``context_length``
    random tokens; the cache is restored after every measurement. ``fast_path``: "auto" = the fp32 kernel
    path for fp32 CPU models (as :class:`rasd.SpeculativeGenerator` uses it), False = plain torch, or a
    prepared :class:`FastPath`. ``threads``: torch threads while measuring ("auto": one when a kernel path
    is measured, as in the decode loop; None: leave torch as it is). ``budget_seconds``: stop after the
    round in which that much time has been spent measuring (at least one round).
    """
    sizes = sorted(set(int(s) for s in tree_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError("tree_sizes must be positive integers")
    if context_length < 1:
        raise ValueError("context_length must be >= 1")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    param = next(model.parameters())
    if fast_path == "auto":
        fast_path = param.device.type == "cpu" and param.dtype == torch.float32
    fp = fast_path if isinstance(fast_path, FastPath) else (FastPath.for_model(model) if fast_path else None)
    if threads == "auto":
        threads = 1 if fp is not None and fp.config.backend == "kernel" else None
    if fp is not None:
        allow_grouped_sdpa()
    # One fixed path at every size: the measurement is of that path, whatever a plan would choose.
    plan = ForwardPlan(paths=(fp,), threads=threads)
    return _profile(model, sizes, context_length, repeats, plan, seed, budget_seconds)


def _profile(
    model,
    sizes: list[int],
    context_length: int,
    repeats: int,
    plan: ForwardPlan,
    seed: int,
    budget_seconds: float | None = None,
) -> dict[int, float]:
    """Median time per size over ``repeats`` rounds (fewer, but at least one, once ``budget_seconds`` of
    measuring are spent: a large model's forwards are long enough that one round is already stable)."""
    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (context_length,), generator=gen)
    session = TargetSession(model, context, plan=plan)
    trees = {s: TokenTree.chain(torch.randint(0, vocab, (s - 1,), generator=gen).numpy()) for s in sizes}
    times: dict[int, list[float]] = {s: [] for s in sizes}
    with plan.decode_threads():
        session.verify(trees[sizes[0]])  # warm-up: allocations, first-call dispatch
        session.discard()
        start = time.perf_counter()
        # Round-robin over the sizes, so that slow drifts of the machine (other tenants, clocks) affect
        # every size alike and the ratios T(n)/T(1) stay meaningful.
        for _ in range(repeats):
            for size in sizes:
                begin = _sync_time(param.device)
                session.verify(trees[size])
                times[size].append(_sync_time(param.device) - begin)
                session.discard()  # back to the same past for the next measurement
            if budget_seconds is not None and time.perf_counter() - start >= budget_seconds:
                break
    return {size: statistics.median(t) for size, t in times.items()}


@functools.cache
def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), for cache keys and benchmark records."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def architecture_key(model: torch.nn.Module) -> dict[str, Any]:
    """What the cost of a forward depends on in a model's config: its shape, not where it was loaded from."""
    config = model.config.to_dict()
    return {k: v for k, v in sorted(config.items()) if k not in _NOT_SHAPE}


def _curve_path(model: torch.nn.Module, fp: FastPath | None, threads: int | None, sizes, context) -> Path:
    from rasd._assets import cache_dir

    param = next(model.parameters())
    import transformers

    key = json.dumps(
        {
            "architecture": architecture_key(model),
            "dtype": str(param.dtype),
            "device": str(param.device),
            "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name(param.device) if param.device.type == "cuda" else None,
            "machine": platform.machine(),
            "path": fp.tag if fp is not None else "torch",
            "forward": "lean" if lean_applies(model) else "model",  # TargetSession's forward (rasd.lean)
            "kernel": [_core.small_gemm_isa(), KERNEL_REVISION, _core.get_num_threads()] if fp else None,
            "threads": threads if threads is not None else torch.get_num_threads(),
            "versions": [torch.__version__, transformers.__version__, __version__],
            "sizes": list(sizes),
            "context": context,
        },
        sort_keys=True,
        default=str,
    )
    return cache_dir() / "costmodel" / f"{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"


def cached_profile(
    model: torch.nn.Module,
    path: FastPath | None,
    *,
    threads: int | None,
    quick: bool = True,
    refresh: bool = False,
) -> dict[int, float]:
    """The whole-forward cost profile of ``model`` on ``path``, measured once per machine and then read
    from ``$RASD_CACHE/costmodel``. A full measurement (``rasd calibrate``) is used when present; otherwise
    a quick one is made (and cached) on first use, with one line logged."""
    full = _curve_path(model, path, threads, (*DEFAULT_TREE_SIZES, 64), FULL_CONTEXT)
    candidates = (
        [full] if not quick else [full, _curve_path(model, path, threads, QUICK_SIZES, QUICK_CONTEXT)]
    )
    if not refresh:
        for file in candidates:
            try:
                return {int(k): float(v) for k, v in json.loads(file.read_text()).items()}
            except (OSError, ValueError):
                continue
    file = candidates[-1]
    if quick:
        sizes, context, repeats, budget = QUICK_SIZES, QUICK_CONTEXT, QUICK_REPEATS, QUICK_BUDGET_SECONDS
    else:
        sizes, context, repeats, budget = (*DEFAULT_TREE_SIZES, 64), FULL_CONTEXT, 3, None
    name = getattr(model.config, "_name_or_path", "") or type(model).__name__
    tag = path.tag if path is not None else "torch"
    log.warning(
        "rasd: measuring %s forwards on this machine (%s path, %s; once, cached in %s; "
        "`rasd calibrate MODEL` does it ahead of time)",
        Path(str(name)).name,
        tag,
        "quick" if quick else "full",
        file.parent,
    )
    start = time.perf_counter()
    profile = profile_verify(
        model,
        sizes,
        context,
        repeats=repeats,
        fast_path=path if path is not None else False,
        threads=threads,
        budget_seconds=budget,
    )
    log.info("rasd: measured in %.1f s", time.perf_counter() - start)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, profile)
    return profile


def forward_plan(
    model: torch.nn.Module,
    paths: Sequence[FastPath] = (),
    *,
    threads: int | None = None,
    quick: bool = True,
    refresh: bool = False,
) -> ForwardPlan:
    """The plan running each forward size of ``model`` on the cheapest of plain torch and ``paths``,
    from whole-forward curves measured once per machine (see :func:`cached_profile`). Plans are kept per
    model, so every generator over the same model shares one."""
    param = next(model.parameters())
    key = (tuple(fp.config for fp in paths), threads, param.dtype, str(param.device))
    per_model = _plans.setdefault(model, {})
    if key not in per_model or refresh:
        if paths:
            allow_grouped_sdpa()
        candidates: tuple[FastPath | None, ...] = (None, *paths)
        curves = tuple(
            CostCurve.from_profile(cached_profile(model, fp, threads=threads, quick=quick, refresh=refresh))
            for fp in candidates
        )
        per_model[key] = ForwardPlan(paths=candidates, curves=curves, threads=threads)
    return per_model[key]


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class CostCurve:
    """Forward cost T(n) in seconds for n tokens fed (root + nodes), from measured points."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("sizes and seconds must be non-empty and of equal length")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError("sizes must be strictly increasing positive integers")
        if min(self.seconds) <= 0 or not all(math.isfinite(s) for s in self.seconds):
            raise ValueError("seconds must be positive and finite")

    @classmethod
    def from_profile(cls, profile: dict[int, float]) -> CostCurve:
        sizes = tuple(sorted(profile))
        return cls(sizes, tuple(float(profile[s]) for s in sizes))

    def __call__(self, n: int | float) -> float:
        """T(n): interpolated inside the measured range, extrapolated linearly outside it."""
        xs, ys = np.asarray(self.sizes, float), np.asarray(self.seconds, float)
        if len(xs) == 1:
            return float(ys[0] * max(n, 1) / xs[0]) if n > xs[0] else float(ys[0])
        if n <= xs[0]:
            return float(ys[0])
        if n >= xs[-1]:
            slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
            return float(ys[-1] + max(slope, 0.0) * (n - xs[-1]))
        return float(np.interp(n, xs, ys))

    def relative(self) -> dict[int, float]:
        """T(n) / T(1) at the measured sizes."""
        base = self(1)
        return {s: t / base for s, t in zip(self.sizes, self.seconds, strict=True)}
