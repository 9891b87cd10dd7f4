"""Measured cost of the target's verification forward, as a function of tree size.

``profile_verify`` times the project's own verification path (:class:`rasd.verify.TargetSession`, with the
CPU fast path when it is on) on a real KV cache of the requested context length. :class:`CostCurve` turns
the measurements into a cost for any node count (linear interpolation between measured sizes, linear
extrapolation beyond), which the budget planner uses to decide how large a tree pays for itself.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from rasd import _core
from rasd.fastpath import _KERNEL_REVISION, FastPath
from rasd.tree import TokenTree
from rasd.verify import TargetSession

DEFAULT_TREE_SIZES = (1, 2, 4, 8, 16, 32)


def profile_verify(
    model: torch.nn.Module,
    tree_sizes: Iterable[int] = DEFAULT_TREE_SIZES,
    context_length: int = 512,
    *,
    repeats: int = 3,
    fast_path: bool | FastPath | str = "auto",
    seed: int = 0,
) -> dict[int, float]:
    """Median seconds of one verification forward per tree size.

    ``tree_sizes`` count the tokens fed to the target (the root plus tree nodes), so size 1 is a plain
    decode step. Random chains of tokens are verified after a prefilled context of ``context_length``
    random tokens; the cache is restored after every measurement. ``fast_path="auto"`` uses the CPU fast
    path for fp32 CPU models, as :class:`rasd.generate.SpeculativeGenerator` does.
    """
    sizes = sorted(set(int(s) for s in tree_sizes))
    if not sizes or sizes[0] < 1:
        raise ValueError("tree_sizes must be positive integers")
    if context_length < 1:
        raise ValueError("context_length must be >= 1")
    param = next(model.parameters())
    if fast_path == "auto":
        fast_path = param.device.type == "cpu" and param.dtype == torch.float32
    fp = fast_path if isinstance(fast_path, FastPath) else (FastPath(model) if fast_path else None)
    policy = fp.row_policy if fp is not None else None
    if fp is not None:
        fp.row_policy = None  # measure the fast path itself at every size, not a mix of both paths
    try:
        return _profile(model, sizes, context_length, repeats, fp, seed)
    finally:
        if fp is not None:
            fp.row_policy = policy


def _profile(model, sizes: list[int], context_length: int, repeats: int, fp, seed: int) -> dict[int, float]:
    param = next(model.parameters())
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (context_length,), generator=gen)
    session = TargetSession(model, context, fast_path=fp, fast_max_rows=max(sizes) + 1)
    trees = {s: TokenTree.chain(torch.randint(0, vocab, (s - 1,), generator=gen).numpy()) for s in sizes}
    times: dict[int, list[float]] = {s: [] for s in sizes}
    # Round-robin over the sizes, so that slow drifts of the machine (other tenants, clocks) affect every
    # size alike and the ratios T(n)/T(1) stay meaningful. Round 0 warms up (allocations, calibration).
    for r in range(repeats + 1):
        for size in sizes:
            start = _sync_time(param.device)
            session.verify(trees[size])
            elapsed = _sync_time(param.device) - start
            session.discard()  # back to the same past for the next measurement
            if r:
                times[size].append(elapsed)
    return {size: statistics.median(t) for size, t in times.items()}


def cached_profile(
    model: torch.nn.Module,
    tree_sizes: Iterable[int] = DEFAULT_TREE_SIZES,
    context_length: int = 256,
    *,
    fast_path: bool | FastPath | str = "auto",
    refresh: bool = False,
) -> dict[int, float]:
    """:func:`profile_verify`, measured once per machine and model and then read from
    ``$RASD_CACHE/costmodel`` (keyed by the model config, dtype, device, CPU, torch and rasd versions).

    The planner rescales the curve online by the ratio of measured to predicted step times, so a profile
    taken at one context length serves others.
    """
    import hashlib
    import json
    import platform

    from rasd import __version__
    from rasd._assets import cache_dir

    param = next(model.parameters())
    fast = bool(fast_path) and not (
        fast_path == "auto" and not (param.device.type == "cpu" and param.dtype == torch.float32)
    )
    sizes = sorted(set(int(s) for s in tree_sizes))
    key_text = json.dumps(
        [
            model.config.to_json_string(use_diff=False),
            str(param.dtype),
            str(param.device),
            platform.processor(),
            _cpu_name(),
            torch.__version__,
            __version__,
            fast and _KERNEL_REVISION,  # a faster kernel makes an old curve wrong
            fast and _core.small_gemm_isa(),
            fast and (_path_tag(fast_path.config) if isinstance(fast_path, FastPath) else "fp32"),
            sizes,
            context_length,
            torch.get_num_threads(),
        ],
    )
    path = cache_dir() / "costmodel" / f"{hashlib.sha256(key_text.encode()).hexdigest()[:20]}.json"
    if not refresh:
        try:
            return {int(k): float(v) for k, v in json.loads(path.read_text()).items()}
        except (OSError, ValueError):
            pass
    profile = profile_verify(model, sizes, context_length, fast_path=fast_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile))
    tmp.replace(path)
    return profile


def fastest_path_profile(
    model: torch.nn.Module,
    fast: FastPath,
    tree_sizes: Iterable[int] = DEFAULT_TREE_SIZES,
    context_length: int = 256,
) -> dict[int, float]:
    """Time whole forwards of ``model`` over 1..32 tokens with and without ``fast`` (once per machine, then
    from the cache), make ``fast`` serve only the token counts where it is faster
    (:meth:`FastPath.serves`), and return the cost per size of the path that will run.

    Which path wins depends on the CPU, its BLAS and the model: the fast path's kernel streams weights
    once for many rows, but BLAS can match it at one row, and inside the context torch's own ops run on
    fewer threads. Measuring the whole forward settles it for the machine at hand; the result only
    changes speed, never the tokens.
    """
    stock = cached_profile(model, tree_sizes, context_length, fast_path=False)
    mine = cached_profile(model, tree_sizes, context_length, fast_path=fast)
    fast.row_policy = (CostCurve.from_profile(stock), CostCurve.from_profile(mine))
    return {n: min(stock[n], mine[n]) for n in stock}


def _path_tag(config) -> str:
    # The kernel backend keeps its original tag, so existing cached curves stay valid; the torch backend's
    # tag names its weight layout (pre-packed for oneDNN since it was measured faster), so curves timed
    # before that change are not reused.
    return config.weights if config.backend == "kernel" else f"{config.weights}/{config.backend}/packed"


class PathChoice:
    """For every forward size, the fastest of plain torch and each of ``paths`` (whole-forward profiles of
    ``model`` over ``tree_sizes`` tokens, measured once per machine and then read from the cache).

    Used for draft models, which may run on several paths (fp32 BLAS; the native kernel on bf16 weights;
    torch's bf16 matmul), none of which wins everywhere: on a 2-core AMX Xeon, 0.5B draft, the kernel won
    at 2-4 tokens and torch bf16 from 4 tokens up and for prefills. Paths only change speed; for a draft
    model that is all they change, for a target only exact (fp32) paths may be offered.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        paths: Iterable[FastPath],
        tree_sizes: Iterable[int] = (*DEFAULT_TREE_SIZES, 64),
        context_length: int = 256,
    ) -> None:
        self.paths: list[FastPath | None] = [None, *paths]
        self.curves = [
            CostCurve.from_profile(cached_profile(model, tree_sizes, context_length, fast_path=fp or False))
            for fp in self.paths
        ]

    def best(self, rows: int, *, prefill: bool = False) -> FastPath | None:
        """The path (None = plain torch) with the lowest predicted cost for a forward over ``rows`` tokens.
        ``prefill``: only paths that take any row count (plain torch, backend "torch"); the kernel path
        runs torch's own ops on one thread, which its small-forward profile does not price for a prefill."""
        best, best_cost = None, math.inf
        for fp, curve in zip(self.paths, self.curves, strict=True):
            if prefill and fp is not None and fp.config.backend == "kernel":
                continue
            if fp is not None and fp.config.backend == "kernel" and rows > fp.config.max_rows:
                continue
            cost = curve(rows)
            if cost < best_cost:
                best, best_cost = fp, cost
        return best

    def context(self, rows: int, *, prefill: bool = False) -> contextlib.AbstractContextManager:
        """Context manager running a forward over ``rows`` tokens on the path :meth:`best` picks."""
        fp = self.best(rows, prefill=prefill)
        return fp if fp is not None else contextlib.nullcontext()

    def cost(self, rows: int) -> float:
        """Predicted seconds of a forward over ``rows`` tokens on the path that will run."""
        fp = self.best(rows)
        return self.curves[self.paths.index(fp)](rows)

    def names(self, sizes: Iterable[int] = DEFAULT_TREE_SIZES) -> dict[int, str]:
        """Which path runs each size ("torch", "kernel/bf16", "torch/bf16", ...), for logs and tests."""
        out = {}
        for n in sizes:
            fp = self.best(n)
            out[n] = "torch" if fp is None else f"{fp.config.backend}/{fp.config.weights}"
        return out


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _sync_time(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass(frozen=True)
class CostCurve:
    """Verification cost T(n) in seconds for n tokens fed (root + nodes), from measured points."""

    sizes: tuple[int, ...]
    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.sizes) != len(self.seconds) or not self.sizes:
            raise ValueError("sizes and seconds must be non-empty and of equal length")
        if list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError("sizes must be strictly increasing positive integers")
        if min(self.seconds) <= 0:
            raise ValueError("seconds must be positive")

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
