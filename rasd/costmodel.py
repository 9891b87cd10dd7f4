"""Measured cost of the target's verification forward, as a function of tree size.

``profile_verify`` times the project's own verification path (:class:`rasd.verify.TargetSession`, with the
CPU fast path when it is on) on a real KV cache of the requested context length. :class:`CostCurve` turns
the measurements into a cost for any node count (linear interpolation between measured sizes, linear
extrapolation beyond), which the budget planner uses to decide how large a tree pays for itself.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from rasd.fastpath import FastPath
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
    vocab = model.get_output_embeddings().weight.shape[0]
    gen = torch.Generator().manual_seed(seed)
    context = torch.randint(0, vocab, (context_length,), generator=gen)
    session = TargetSession(model, context, fast_path=fp, fast_max_rows=max(sizes) + 1)
    result: dict[int, float] = {}
    for size in sizes:
        tree = TokenTree.chain(torch.randint(0, vocab, (size - 1,), generator=gen).numpy())
        times = []
        for r in range(repeats + 1):  # the first run warms up (allocations, calibration)
            start = _sync_time(param.device)
            session.verify(tree)
            elapsed = _sync_time(param.device) - start
            session.discard()  # back to the same past for the next measurement
            if r:
                times.append(elapsed)
        result[size] = statistics.median(times)
    return result


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
