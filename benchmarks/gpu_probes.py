"""Measurement helpers for the GPU check (:mod:`benchmarks.gpu_check`) that know nothing of rasd.

- :data:`SHAPES`: random-weight causal LMs of real shapes (Qwen2.5-1.5B, Qwen2.5-7B) built from a config in
  code, and tiny stand-ins of the same architecture for the CPU form. No weights travel to a GPU machine
  (only 64 MiB of files do), and the cost of a forward depends on the shape, not on the weights.
- :func:`chi_square_pvalue`: Pearson's test with pooled small cells, on torch alone (the GPU machine has no
  scipy).
- :class:`TransferCounter`, :class:`SyncCounter`, :func:`profiled_memcpys`: three views of host-device
  traffic during one decoding step: cross-device copies seen by the dispatcher (with the Python line that
  asked for them), synchronising CUDA calls (torch's sync debug mode) and the memcpy events the CUDA
  profiler records (the ground truth, without attribution).
"""

from __future__ import annotations

import collections
import os
import sys
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode


@dataclass(frozen=True)
class Shape:
    """A Qwen2-architecture causal LM shape. ``init_std`` is the weights' initializer range: the real
    shapes keep Qwen's own 0.02 (logit spread ~0.8, top-2 gaps ~0.1: realistic for numeric ties), the tiny
    ones use 0.2 so that their greedy choices are not ties."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool
    init_std: float = 0.02
    max_positions: int = 32768

    def config(self) -> Any:
        from transformers import Qwen2Config

        return Qwen2Config(
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            vocab_size=self.vocab,
            tie_word_embeddings=self.tie_embeddings,
            max_position_embeddings=self.max_positions,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
            use_sliding_window=False,
            initializer_range=self.init_std,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )

    @property
    def parameters(self) -> int:
        """Parameter count (embeddings counted once when tied)."""
        attn = self.hidden * self.hidden * 2 + 2 * self.hidden * (self.hidden // self.heads) * self.kv_heads
        attn_bias = self.hidden + 2 * (self.hidden // self.heads) * self.kv_heads
        mlp = 3 * self.hidden * self.intermediate
        per_layer = attn + attn_bias + mlp + 2 * self.hidden
        heads = 1 if self.tie_embeddings else 2
        return self.layers * per_layer + heads * self.vocab * self.hidden + self.hidden


# Qwen2.5-1.5B and Qwen2.5-7B as published (config.json of the base models), and tiny stand-ins of the same
# architecture for the CPU form (GQA kept, so the grouped-head attention path runs too).
SHAPES: dict[str, Shape] = {
    "qwen2.5-1.5b": Shape("qwen2.5-1.5b", 1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-7b": Shape("qwen2.5-7b", 3584, 18944, 28, 28, 4, 152064, False),
    "tiny-1.5b": Shape("tiny-1.5b", 64, 128, 2, 4, 2, 512, True, init_std=0.2, max_positions=2048),
    "tiny-7b": Shape("tiny-7b", 96, 192, 3, 6, 2, 512, False, init_std=0.2, max_positions=2048),
}


def build_model(shape: Shape, device: torch.device | str, *, seed: int = 0) -> Any:
    """A random-weight fp32 causal LM of ``shape`` on ``device`` (initialised there: a 7B in seconds on a
    GPU), ``sdpa`` attention, eval mode, greedy runs to the full length (no EOS)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(shape.config(), attn_implementation="sdpa")
    model = model.to(device=device, dtype=torch.float32).eval()
    # A random model emits its EOS id like any other token; the checks compare fixed-length outputs.
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 1
    return model


def chi_square_pvalue(counts: Any, probs: Any, *, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness-of-fit p-value of ``counts`` [K] against ``probs`` [K].

    Cells expected below ``min_expected`` are pooled into one (the test's usual validity rule); the
    p-value is the regularised upper incomplete gamma Q(df / 2, stat / 2), as scipy computes it.
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    probs = torch.as_tensor(probs, dtype=torch.float64).flatten()
    if counts.shape != probs.shape:
        raise ValueError(f"counts {tuple(counts.shape)} and probs {tuple(probs.shape)} differ in shape")
    probs = probs / probs.sum()  # float32 probabilities sum to 1 only up to rounding
    total = counts.sum()
    keep = probs * total >= min_expected
    obs = torch.cat([counts[keep], counts[~keep].sum()[None]])
    exp = torch.cat([probs[keep], probs[~keep].sum()[None]]) * total
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    if obs.numel() < 2:
        raise ValueError("fewer than two cells with enough expected counts: draw more samples")
    stat = ((obs - exp) ** 2 / exp).sum()
    df = torch.tensor(float(obs.numel() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def _site() -> str:
    """``file:line function`` of the innermost frame outside torch and this module: who asked."""
    here = os.path.abspath(__file__)
    for frame in reversed(traceback.extract_stack(limit=40)[:-2]):
        path = os.path.abspath(frame.filename)
        if path == here or f"{os.sep}torch{os.sep}" in path:
            continue
        parts = Path(path).parts
        short = "/".join(parts[-2:]) if len(parts) >= 2 else path
        return f"{short}:{frame.lineno} {frame.name}"
    return "?"


class TransferCounter(TorchDispatchMode):
    """Counts tensor copies between the host and a device, per direction and call site.

    Seen at the dispatcher: ``.to(device)`` / ``.cpu()`` (``_to_copy``), ``copy_`` across devices,
    ``.item()`` / ``float(t)`` / ``int(t)`` (``_local_scalar_dense``: a device-to-host read) and
    ``torch.tensor(data, device=...)`` (``lift_fresh`` of a device tensor made from host data). Blind to
    copies a kernel makes internally (e.g. ``nonzero``'s size read): :func:`profiled_memcpys` sees those.
    """

    def __init__(self) -> None:
        super().__init__()
        self.events: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        direction = _direction(func, args, kwargs)
        if direction is not None:
            self.events[(direction, _site())] += 1
        return func(*args, **kwargs)

    def totals(self) -> dict[str, int]:
        out = {"HtoD": 0, "DtoH": 0}
        for (direction, _), n in self.events.items():
            out[direction] += n
        return out

    def by_site(self) -> dict[str, int]:
        """``"HtoD file:line function"`` -> count, most frequent first."""
        return {f"{d} {site}": n for (d, site), n in self.events.most_common()}


def _device_of(value: Any) -> torch.device | None:
    return value.device if isinstance(value, torch.Tensor) else None


def _direction(func: Any, args: Any, kwargs: dict[str, Any]) -> str | None:
    """ "HtoD", "DtoH" or None for one aten call."""
    aten = torch.ops.aten
    if func is aten._to_copy.default:
        src = _device_of(args[0])
        dst = kwargs.get("device")
        dst = torch.device(dst) if dst is not None else src
        return _crossing(src, dst)
    if func in (aten.copy_.default, aten.copy.default):
        return _crossing(_device_of(args[1]), _device_of(args[0]))
    if func is aten._local_scalar_dense.default:
        src = _device_of(args[0])
        return "DtoH" if src is not None and src.type not in ("cpu", "meta") else None
    if func is aten.lift_fresh.default:
        dev = _device_of(args[0])
        return "HtoD" if dev is not None and dev.type not in ("cpu", "meta") else None
    return None


def _crossing(src: torch.device | None, dst: torch.device | None) -> str | None:
    if src is None or dst is None or (src.type == "cpu") == (dst.type == "cpu"):
        return None
    return "HtoD" if src.type == "cpu" else "DtoH"


class SyncCounter:
    """Counts operations that block the host on the GPU (torch's sync debug mode, CUDA only), per call site.

    >>> with SyncCounter() as syncs:
    ...     step()
    >>> syncs.total, syncs.by_site
    """

    def __init__(self) -> None:
        self.total = 0
        self.by_site: dict[str, int] = {}
        self._catcher: Any = None
        self._saved = 0

    def __enter__(self) -> SyncCounter:
        self._catcher = warnings.catch_warnings(record=True)
        self._records = self._catcher.__enter__()
        warnings.simplefilter("always")
        self._saved = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(1)  # 1 = warn on every synchronising call
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.set_sync_debug_mode(self._saved)
        self._catcher.__exit__(*exc)
        counts: collections.Counter[str] = collections.Counter()
        for w in self._records:
            if "synchronizing" in str(w.message):
                counts[f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}"] += 1
        self.total = sum(counts.values())
        self.by_site = dict(counts.most_common())


def profiled_memcpys(fn: Callable[[], Any]) -> dict[str, Any]:
    """Run ``fn`` under the CUDA profiler; count memcpy events by direction and the synchronising runtime
    calls. Returns ``{"HtoD": n, "DtoH": n, "DtoD": n, "events": {name: count}}`` or ``{"error": ...}`` where
    the profiler cannot record CUDA activity."""
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
    except (RuntimeError, AssertionError) as exc:
        return {"error": f"{type(exc).__name__}: {exc}"}
    names: collections.Counter[str] = collections.Counter()
    for event in prof.events():
        low = event.name.lower()
        if "memcpy" in low or "synchron" in low:
            names[event.name] += 1
    out: dict[str, Any] = {"HtoD": 0, "DtoH": 0, "DtoD": 0}
    for name, n in names.items():
        for direction in out:
            if name.startswith(f"Memcpy {direction}"):
                out[direction] += n
    out["events"] = dict(names.most_common())
    return out


@contextmanager
def stopwatch(device: torch.device) -> Iterator[list[float]]:
    """Wall seconds of the block, GPU work included (synchronises before and after on CUDA)."""
    import time

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    box: list[float] = []
    start = time.perf_counter()
    yield box
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    box.append(time.perf_counter() - start)


def log(message: str) -> None:
    """One progress line on stderr, flushed (the device tool returns the last lines of output)."""
    print(message, file=sys.stderr, flush=True)
