"""A CPU fast path for the linear layers of an unmodified Hugging Face model at small token counts.

Why: on a CPU, ``F.linear`` with 2-16 rows costs nearly 2-16 single-row calls (it re-streams the weight
matrix), so verifying a small tree of candidate tokens costs as many decode steps as it has tokens.
:func:`rasd._core.small_gemm` streams each weight matrix once for all rows (see
``cpp/include/rasd/small_gemm.h``); with it, one forward over a handful of tokens costs about one decode
step.

How: :class:`FastPath` is a context manager that replaces ``forward`` of every ``nn.Linear`` instance of
a model (attention projections, MLP, ``lm_head``) with a dispatcher, and restores them on exit. No
modeling code is forked and no model attribute other than those instance ``forward`` overrides is touched.
Inside the context it also sets transformers' ``TRANSFORMERS_SDPA_FORCE_GQA=1`` (CPU only): with a custom
mask, HF's SDPA integration otherwise copies every key/value head group (``repeat_kv``) at every layer,
which for the 1.5B target at context 512 moves ~180 MB per forward; torch's CPU SDPA takes grouped
heads with a mask directly.
The dispatcher uses the native kernel when the input is on the CPU, fp32, has at most ``max_rows`` rows
and calibration found the kernel faster for that layer shape and row count; otherwise it calls the
original ``F.linear``. Calibration results are cached per process and on disk (keyed by CPU, torch and
rasd versions).

``weights="bf16"`` keeps a bf16 copy of every weight for the kernel (half the memory traffic). Only use it
for a *draft* model: its outputs are proposals, so lower precision changes speed, never the speculative
output. The target model must stay exact (``weights="fp32"``, the default).

``backend="torch"`` (bf16 weights only) sends every linear call, whatever its row count, to torch's own bf16
matmul on the same bf16 copy (activations cast to bf16, outputs back to fp32, so the KV cache and attention
stay fp32). On CPUs with AMX or AVX512-BF16, oneDNN's bf16 GEMM beats both fp32 BLAS and the kernel from a
few rows up; measured on a 2-core Xeon with AMX, 0.5B draft at context 574: a whole forward over 8 tokens
456 ms (fp32 BLAS) / 408 ms (kernel, bf16) / 221 ms (torch bf16), a 573-token prefill 3.3 s -> 2.0 s. The
weights are handed to oneDNN pre-packed (:func:`_onednn_packed`) where torch allows it. On CPUs without
bf16 units it is slower than fp32; :class:`rasd.costmodel.PathChoice` measures and decides.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import threading
import time
import types
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rasd import __version__, _core
from rasd._assets import cache_dir

CALIBRATION_ROWS = (1, 2, 4, 8, 16, 32)
_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# nn.Linear -> (data_ptr of the fp32 weight, its bf16 copy as int16): one copy per model for every FastPath.
_bf16_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_calibration_lock = threading.Lock()
_calibration: dict[str, list[int]] = {}  # shape key -> row counts where the kernel wins
# Bumped whenever the native kernel's speed changes, so that stale on-disk calibrations are not reused.
_KERNEL_REVISION = 2


@dataclass(frozen=True)
class FastPathConfig:
    """max_rows: largest token count sent to the kernel (prefill of long prompts stays on BLAS).
    weights: "fp32" (exact, for targets) or "bf16" (a converted copy, for draft models only).
    calibrate: measure kernel vs F.linear per layer shape; False = use the kernel for every eligible call.
    torch_threads: torch's intra-op threads inside the context (None = leave as is). torch's OpenMP
        workers spin after each op and compete with the kernel's threads for the cores: measured on the
        0.5B model at 4 tokens, 0.188 s per forward with both at 2 threads, 0.099 s with torch at 1.
        Keep large forwards (prefill) outside the context, where torch uses all its threads.
        Ignored with ``backend="torch"`` (no kernel threads to compete with: torch keeps all of its own).
    backend: "kernel" (the native small-GEMM kernel up to ``max_rows`` rows, calibrated per layer shape) or
        "torch" (torch's bf16 matmul on the bf16 weight copy for every row count; needs ``weights="bf16"``).
    """

    max_rows: int = 32
    weights: str = "fp32"
    calibrate: bool = True
    torch_threads: int | None = 1
    backend: str = "kernel"

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16"):
            raise ValueError(f"weights must be 'fp32' or 'bf16', got {self.weights!r}")
        if self.backend not in ("kernel", "torch"):
            raise ValueError(f"backend must be 'kernel' or 'torch', got {self.backend!r}")
        if self.backend == "torch" and self.weights != "bf16":
            raise ValueError(
                "backend='torch' computes in bf16 and needs weights='bf16' (a draft model); an fp32 model "
                "outside the context already runs torch's fp32 matmul"
            )
        if not 1 <= self.max_rows <= 256:
            raise ValueError(f"max_rows must be in [1, 256], got {self.max_rows}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or None, got {self.torch_threads}")


def _shape_key(in_features: int, out_features: int, weights: str) -> str:
    # Calibrations differ with torch's thread count (F.linear's speed), so it is part of the key.
    return f"{in_features}x{out_features}:{weights}:t{torch.get_num_threads()}"


def _calibration_file() -> Path:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tag = (
        f"{cpu}|{torch.__version__}|{__version__}|k{_KERNEL_REVISION}|{_core.small_gemm_isa()}"
        f"|{_core.get_num_threads()}"
    )
    digest = hashlib.sha256(tag.encode()).hexdigest()[:16]
    return cache_dir() / "fastpath" / f"calibration-{digest}.json"


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _measure_shape(in_features: int, out_features: int, weights: str) -> list[int]:
    """Row counts (of CALIBRATION_ROWS) for which the kernel beats F.linear on this shape.

    Uses enough distinct weight matrices that they do not fit in the last-level cache, as in a real
    forward pass where every layer's weights come from DRAM.
    """
    gen = torch.Generator().manual_seed(0)
    per_matrix = in_features * out_features * 4
    copies = max(1, min(8, math.ceil((64 << 20) / per_matrix)))
    mats = [torch.randn(out_features, in_features, generator=gen) for _ in range(copies)]
    kernel_w = [
        m.to(torch.bfloat16).view(torch.int16).numpy() if weights == "bf16" else m.numpy() for m in mats
    ]
    reps = 3 if per_matrix * copies > (256 << 20) else 5
    wins = []
    for rows in CALIBRATION_ROWS:
        x = torch.randn(rows, in_features, generator=gen)
        out = np.empty((rows, out_features), dtype=np.float32)
        xn = x.numpy()

        def stock(x=x):
            for m in mats:
                F.linear(x, m)

        def kernel(xn=xn, out=out):
            for w in kernel_w:
                _core.small_gemm(xn, w, None, out)

        if _median_time(kernel, reps) < _median_time(stock, reps):
            wins.append(rows)
    return wins


def _winning_rows(in_features: int, out_features: int, weights: str) -> list[int]:
    key = _shape_key(in_features, out_features, weights)
    with _calibration_lock:
        if key in _calibration:
            return _calibration[key]
        path = _calibration_file()
        with contextlib.suppress(OSError, ValueError):
            _calibration.update(json.loads(path.read_text()))
        if key not in _calibration:
            _calibration[key] = _measure_shape(in_features, out_features, weights)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_text(json.dumps(_calibration, indent=1, sort_keys=True))
            tmp.replace(path)
        return _calibration[key]


def _row_limit(wins: list[int], max_rows: int) -> int:
    """Largest row count r such that the kernel won at every calibrated size <= r (0 = never use it)."""
    limit = 0
    for rows in CALIBRATION_ROWS:
        if rows > max_rows or rows not in wins:
            break
        limit = rows
    # Between the last winning size and the next calibrated one the kernel's cost grows smoothly, so
    # extend halfway rather than dropping to BLAS at limit + 1.
    if limit and limit < max_rows:
        nxt = next((r for r in CALIBRATION_ROWS if r > limit), limit)
        limit = min(max_rows, (limit + nxt) // 2)
    return limit


class FastPath:
    """Context manager: route small-row CPU linear calls of ``model`` through the native kernel.

    >>> with FastPath(model):
    ...     logits = model(input_ids, cache=cache).logits

    Re-entrant for the same model (nested uses are no-ops). Thread-safe to *use* the model from one
    thread at a time, as with any HF model.
    """

    def __init__(self, model: nn.Module, config: FastPathConfig | None = None) -> None:
        self.model = model
        self.config = config or FastPathConfig()
        self._patched: list[nn.Linear] = []
        self._depth = 0
        self._saved_threads: int | None = None
        self._saved_gqa: str | None = None
        self._cpu_entered = False
        # id(module) -> (kernel weight, bias, row limit, data_ptr of the weight it was made from, the weight
        # pre-packed for oneDNN: backend "torch" only, None where unavailable); made once per weight
        self._kernel_weights: dict[
            int, tuple[np.ndarray, np.ndarray | None, int, int, torch.Tensor | None]
        ] = {}
        # (stock, fast) whole-forward cost curves T(rows); None = serve every eligible forward.
        self.row_policy: tuple[Callable[[float], float], Callable[[float], float]] | None = None

    def serves(self, rows: int) -> bool:
        """Whether a whole forward over ``rows`` tokens should run inside this context.

        Per-layer calibration is not enough: inside the context torch runs its other ops (attention,
        norms) on ``torch_threads`` threads, and on some CPUs BLAS is as fast as the kernel for one row.
        Measured on a 2-core Intel Xeon (AVX-512 host), 1.5B target: the context is 0.93x stock at 1 token,
        2.05x at 8 and 0.76x at 32; the 0.5B at fp32 0.63-0.70x at every size, while on a 2-core EPYC it
        won everywhere. :func:`rasd.costmodel.fastest_path_profile` measures both curves once per machine
        and sets ``row_policy``; this then picks the cheaper path for each row count.
        """
        if self.row_policy is None:
            return True
        stock, fast = self.row_policy
        return fast(rows) < stock(rows)

    @classmethod
    def for_model(cls, model: nn.Module, config: FastPathConfig | None = None) -> FastPath:
        """A prepared FastPath shared by every user of ``model`` with the same config (bf16 weight copies
        and calibration are made once per model, not once per generator)."""
        config = config or FastPathConfig()
        per_model = _shared.setdefault(model, {})
        if config not in per_model:
            per_model[config] = cls(model, config).prepare()
        return per_model[config]

    @property
    def active(self) -> bool:
        return self._depth > 0

    def prepare(self) -> FastPath:
        """Build kernel weights and run calibration now (otherwise the first ``with`` does it)."""
        if next(self.model.parameters()).device.type == "cpu":
            with self:
                pass
        return self

    def _prepare(self) -> None:
        for module in self.model.modules():
            if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                continue
            if module.weight.dtype != torch.float32:
                continue
            known = self._kernel_weights.get(id(module))
            if known is not None and known[3] == module.weight.data_ptr():
                continue
            bf16 = self.config.weights == "bf16"
            kernel_w = _bf16_copy(module) if bf16 else module.weight.detach().contiguous().numpy()
            bias = module.bias.detach().contiguous().numpy() if module.bias is not None else None
            packed = None
            if self.config.backend == "torch":
                limit = 1 << 62  # every row count
                packed = _onednn_packed(torch.from_numpy(kernel_w).view(torch.bfloat16))
            elif self.config.calibrate:
                wins = _winning_rows(module.in_features, module.out_features, self.config.weights)
                limit = _row_limit(wins, self.config.max_rows)
            else:
                limit = self.config.max_rows
            self._kernel_weights[id(module)] = (kernel_w, bias, limit, module.weight.data_ptr(), packed)

    def __enter__(self) -> FastPath:
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        if self._depth == 0 and on_cpu:
            self._saved_gqa = os.environ.get(_GQA_ENV)
            os.environ[_GQA_ENV] = "1"
            self._cpu_entered = True
            if self.config.torch_threads is not None and self.config.backend == "kernel":
                self._saved_threads = torch.get_num_threads()
                torch.set_num_threads(self.config.torch_threads)
            self._prepare()
            for module in self.model.modules():
                entry = self._kernel_weights.get(id(module))
                if entry is None or entry[2] == 0:
                    continue
                kernel_w, bias, limit, _, packed = entry
                if self.config.backend == "torch":
                    forward = _make_torch_bf16_forward(kernel_w, bias, packed)
                else:
                    forward = _make_forward(kernel_w, bias, limit, self)
                module.forward = types.MethodType(forward, module)
                self._patched.append(module)
        self._depth += 1
        return self

    def __exit__(self, *exc) -> None:
        self._depth -= 1
        if self._depth == 0:
            for module in self._patched:
                del module.forward  # back to nn.Linear.forward
            self._patched.clear()
            if self._saved_threads is not None:
                torch.set_num_threads(self._saved_threads)
                self._saved_threads = None
            if self._saved_gqa is not None:
                os.environ[_GQA_ENV] = self._saved_gqa
            elif self._cpu_entered:
                os.environ.pop(_GQA_ENV, None)
            self._saved_gqa = None
            self._cpu_entered = False


def _bf16_copy(module: nn.Linear) -> np.ndarray:
    """The bf16 copy of ``module.weight`` (as int16 [out, in]), made once and shared by every FastPath."""
    known = _bf16_copies.get(module)
    ptr = module.weight.data_ptr()
    if known is None or known[0] != ptr:
        known = (ptr, module.weight.detach().to(torch.bfloat16).view(torch.int16).contiguous().numpy())
        _bf16_copies[module] = known
    return known[1]


def _onednn_packed(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` (bf16 [out, in]) reordered once into oneDNN's blocked layout, or None where this torch
    build or CPU has no oneDNN bf16 linear.

    ``F.linear`` on a plain bf16 weight reorders it into that layout on every call; for a draft model's
    small forwards the reorder costs as much as the product (measured on a 2-core AMX Xeon, 896 -> 4864 at
    1-8 rows: 0.61 ms plain, 0.38 ms packed; the 0.5B's 896 -> 151936 head 16-17 ms vs 11 ms). A packed
    weight serves any row count with the same results.
    """
    reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
    if reorder is None or not torch.backends.mkldnn.is_available():
        return None
    try:
        packed = reorder(weight, 1)
        probe = torch.ones(2, weight.shape[1], dtype=torch.bfloat16)
        got, want = _packed_linear(probe, packed, None).float(), F.linear(probe, weight).float()
        if got.shape != want.shape or not torch.allclose(got, want, rtol=2e-2, atol=2e-2):
            return None
    except RuntimeError:
        return None
    return packed


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def _make_torch_bf16_forward(kernel_w: np.ndarray, bias: np.ndarray | None, packed: torch.Tensor | None):
    weight = torch.from_numpy(kernel_w).view(torch.bfloat16)  # shares the copy, no new memory
    bias_t = torch.from_numpy(bias).to(torch.bfloat16) if bias is not None else None

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and not torch.is_grad_enabled():
            xb = x.to(torch.bfloat16)
            y = _packed_linear(xb, packed, bias_t) if packed is not None else F.linear(xb, weight, bias_t)
            return y.to(torch.float32)
        return F.linear(x, self.weight, self.bias)

    return forward


def _make_forward(kernel_w: np.ndarray, bias: np.ndarray | None, limit: int, owner: FastPath):
    out_features = kernel_w.shape[0]

    def forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if (
            0 < rows <= limit
            and x.dtype == torch.float32
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            x2 = x.reshape(rows, x.shape[-1]).contiguous()
            out = torch.empty(rows, out_features, dtype=torch.float32)
            _core.small_gemm(x2.numpy(), kernel_w, bias, out.numpy())
            return out.view(*x.shape[:-1], out_features)
        full = owner._saved_threads
        if rows > limit and full is not None and full > torch.get_num_threads():
            # Too many rows for the kernel (a large tree or a prefill): BLAS with all of torch's threads,
            # not the single thread the context keeps for small calls (measured on the 1.5B at 64
            # tokens: 2.7 s per forward with 1 thread vs 1.9 s stock).
            inner = torch.get_num_threads()
            torch.set_num_threads(full)
            try:
                return F.linear(x, self.weight, self.bias)
            finally:
                torch.set_num_threads(inner)
        return F.linear(x, self.weight, self.bias)

    return forward
