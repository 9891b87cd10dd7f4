"""CPU fast paths for the linear layers of an unmodified Hugging Face model, and the plan that says which
path each forward size takes.

Why: on a CPU, ``F.linear`` with 2-16 rows costs nearly 2-16 single-row calls (it re-streams the weight
matrix), so verifying a small tree of candidate tokens costs as many decode steps as it has tokens.
:func:`rasd._core.small_gemm` streams each weight matrix once for all rows (see
``cpp/include/rasd/small_gemm.h``); with it, one forward over a handful of tokens costs about one decode
step.

How: :meth:`FastPath.for_model` turns the model's ``nn.Linear`` layers into :class:`_RoutedLinear`, an
``nn.Linear`` whose forward first asks the fast path that is active *on the calling thread* (a thread-local
set by :meth:`FastPath.active` for the duration of one forward) and otherwise is ``nn.Linear``'s own forward:
same parameters, state dict and outputs, and it pickles and deep-copies as a plain ``nn.Linear``. No
environment variable or thread count changes, and another thread using the same model meanwhile runs the
stock computation. (A :class:`torch.overrides.TorchFunctionMode` did the routing before: it sees every torch
call of a forward, 1,997 for the 1.5B Qwen target, and cost ~6 ms of a 1-token forward, 293.7 -> 287.2 ms
on a 2-core Xeon; it remains only for ``nn.Linear`` subclasses, whose own forward may do more.)

``weights="bf16"`` keeps a bf16 copy of every weight (half the memory traffic), ``weights="int8"`` an int8
copy with one fp32 scale per output row (a quarter; symmetric, round to nearest). Only for a *draft* model:
its outputs are proposals, so lower precision changes speed, never the speculative output. A target stays
exact (``weights="fp32"``, the default). Why int8 too: a draft forward on a CPU is mostly the weight
stream (0.5B Qwen draft on a 2-core EPYC, one token at context 300, bf16 weights: 77-84 ms per forward,
of which the linear layers ~50 ms), and ``int8`` halves that stream again.

``backend="torch"`` sends every linear call, whatever its row count, to torch's own matmul on the weight
copy. With ``weights="bf16"``: oneDNN's bf16 matmul (activations cast to bf16, outputs back to fp32, so the
KV cache and attention stay fp32). On CPUs with AMX or AVX512-BF16 it beats both fp32 BLAS and the kernel
from a few rows up (2-core Xeon with AMX, 0.5B draft at context 574: a forward over 8 tokens 456 ms fp32
BLAS, 408 ms kernel, 221 ms torch bf16; a 573-token prefill 3.3 s -> 2.0 s). The weights are handed to oneDNN
pre-packed (:func:`_onednn_packed`) where torch allows it. With ``weights="int8"``: torch's dynamically
quantized int8 linear (FBGEMM / oneDNN u8 x s8 GEMM; the activations quantized per call, per tensor, with
the 7-bit range that keeps AVX2's 16-bit pair sums from saturating) on the same int8 weights, pre-packed
once. That is the prefill a CPU without 16-bit matmuls can speed up (2-core AVX2 EPYC, the 0.5B draft's
prefill of 671-709-token Spec-Bench prompts: 3.9-4.0 s fp32, 2.5-2.7 s int8 activations). One int8 scale
per tensor flattens inputs with a few huge columns (LLMs' "massive activations": in the 0.5B Qwen the MLP
down projections' inputs reach 100-500x their median column): ``outlier_ratio`` multiplies the columns
beyond that many times the median column's in fp32 (LLM.int8()'s decomposition, found per call). Teacher-
forced over 244-256 tokens of real code and chat, the 0.5B's top-1 matched its fp32 forward at 70-74 % of
positions with every column in int8, 92-95 % with ``outlier_ratio=6`` (the weight-only int8 kernel: 98-99 %)
at about the same speed (2.6-3.1 s for those prefills).

:class:`ForwardPlan` is the one place that decides which path a forward of n tokens takes (built once per
model and machine from measured whole-forward curves by :func:`rasd.costmodel.forward_plan`), and the torch
thread count of the decode loop (:meth:`ForwardPlan.decode_threads`), set once per request, not per forward.
"""

from __future__ import annotations

import contextlib
import copyreg
import functools
import math
import os
import threading
import warnings
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from rasd import _core

_GQA_ENV = "TRANSFORMERS_SDPA_FORCE_GQA"
_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# nn.Linear -> {weights kind: (_source_key of the layer it was made from, the converted copy)}: one copy
# per layer and kind for every FastPath (see _weight_copy).
_weight_copies: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_prepare_lock = threading.Lock()
_routing = threading.local()  # .fast: the FastPath whose active() the calling thread is inside
# Bumped whenever the native kernel's speed changes, so that stale cached cost curves are not reused.
KERNEL_REVISION = 4  # 4: layers routed by class, not by a TorchFunctionMode (less per-forward overhead)


@dataclass(frozen=True)
class FastPathConfig:
    """max_rows: largest token count sent to the kernel (prefill of long prompts stays on BLAS).
    weights: "fp32" (exact, for targets), or "bf16" / "int8" (a converted copy, for draft models only).
    backend: "kernel" (the native small-GEMM kernel up to ``max_rows`` rows) or "torch" (torch's bf16
        matmul, or its dynamically quantized int8 linear, on the weight copy for every row count; needs
        ``weights="bf16"`` or ``"int8"``).
    outlier_ratio: int8 activations only (backend "torch", weights "int8"): input columns whose largest
        magnitude in the call exceeds this many times the median column's are multiplied in fp32, the rest
        in int8 (LLM.int8()'s decomposition, found per call); 0 = every column in int8.
    exact_bf16: ``weights="fp32"`` only: a layer whose fp32 weight holds only values that bf16 represents
        exactly (a bf16 checkpoint loaded in fp32, the usual way to run one on a CPU) gives the kernel a
        bf16 copy instead: the same numbers at half the memory traffic, and the kernel widens them to fp32
        in registers and accumulates in the same order, so every output is bit-identical to the fp32
        kernel's (the target stays exact). Costs the copy, 2 bytes per weight; False never makes one.
    """

    max_rows: int = 32
    weights: str = "fp32"
    backend: str = "kernel"
    outlier_ratio: float = 0.0
    exact_bf16: bool = True

    def __post_init__(self) -> None:
        if self.weights not in ("fp32", "bf16", "int8"):
            raise ValueError(f"weights must be 'fp32', 'bf16' or 'int8', got {self.weights!r}")
        if self.backend not in ("kernel", "torch"):
            raise ValueError(f"backend must be 'kernel' or 'torch', got {self.backend!r}")
        if self.backend == "torch" and self.weights == "fp32":
            raise ValueError(
                "backend='torch' computes in bf16 or int8 and needs weights='bf16' or 'int8' (a draft "
                "model); an fp32 model outside the fast path already runs torch's fp32 matmul"
            )
        if not (self.outlier_ratio == 0 or self.outlier_ratio >= 1):
            raise ValueError(f"outlier_ratio must be 0 (off) or >= 1, got {self.outlier_ratio}")
        if self.outlier_ratio and not (self.backend == "torch" and self.weights == "int8"):
            raise ValueError("outlier_ratio applies to int8 activations: backend='torch', weights='int8'")
        if not 1 <= self.max_rows <= 256:
            raise ValueError(f"max_rows must be in [1, 256], got {self.max_rows}")
        if not isinstance(self.exact_bf16, bool):
            raise TypeError(f"exact_bf16 must be a bool, got {self.exact_bf16!r}")

    @property
    def tag(self) -> str:
        """Names the path in cache keys and logs ("kernel/fp32", "kernel/bf16", "torch/bf16", "torch/int8",
        "torch/int8-outliers6": int8 activations with fp32 outlier columns)."""
        outliers = f"-outliers{self.outlier_ratio:g}" if self.outlier_ratio else ""
        return f"{self.backend}/{self.weights}{outliers}"


@dataclass(frozen=True)
class _Entry:
    """A prepared linear layer: the weight the kernel reads, its bias, the :func:`_source_key` of the fp32
    weight and bias it was made from (the one invalidation rule: a weight or bias replaced or changed in
    place is never served stale), the bf16
    weight pre-packed for oneDNN (backend "torch" only; None where unavailable), the per-row scale of
    int8 weights (None otherwise), the int8 weight pre-packed for torch's dynamically quantized linear
    (backend "torch" with int8 weights), and the layer (to make the entry again once it changed)."""

    kernel_w: np.ndarray
    bias: np.ndarray | None
    source: tuple[int, ...]
    packed: torch.Tensor | None
    bias_bf16: torch.Tensor | None
    scale: np.ndarray | None
    qpacked: Any
    module: nn.Linear
    inference: bool  # the weight or bias is an inference tensor (no version counter)
    # The tensors the entry was made from: while the entry lives their storage cannot be freed and reused
    # at the same address by another tensor, which would match ``source`` by accident.
    keep: tuple[torch.Tensor | None, torch.Tensor | None]


class FastPath:
    """Prepared fast-path weights for one model; :meth:`active` routes its small linear calls.

    >>> fp = FastPath.for_model(model)
    >>> with fp.active():
    ...     logits = model(input_ids, ...).logits

    Thread-local: only forwards run by the thread inside ``active()`` take the fast path.
    """

    def __init__(self, model: nn.Module, config: FastPathConfig | None = None) -> None:
        # Weakly: FastPath.for_model keeps this path in a WeakKeyDictionary keyed by the model, and a strong
        # reference from the value would keep every prepared model (and its copies) alive for good.
        self._model = weakref.ref(model)
        self.config = config or FastPathConfig()
        self._entries: dict[int, _Entry] = {}  # id(weight parameter) -> prepared entry
        # Every prepared layer -> id of the weight its entry was made for: a layer whose weight Parameter
        # was replaced by another object is found here and prepared again (its old entry dropped).
        self._weight_of: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
        self._needs_mode = False  # some prepared layer is an nn.Linear subclass (not routed)

    @classmethod
    def for_model(cls, model: nn.Module, config: FastPathConfig | None = None) -> FastPath:
        """A prepared FastPath shared by every user of ``model`` with the same config (bf16 copies are made
        once per model, not once per generator)."""
        config = config or FastPathConfig()
        with _prepare_lock:
            per_model = _shared.setdefault(model, {})
            if config not in per_model:
                per_model[config] = cls(model, config).prepare()
            return per_model[config]

    def prepare(self) -> FastPath:
        """Make the kernel weights of every CPU fp32 linear layer (again for any whose weight changed) and
        route those layers (:class:`_RoutedLinear`)."""
        model = self._model()
        if model is None:
            raise RuntimeError("FastPath.prepare: the model it was made for no longer exists")
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.weight.device.type != "cpu":
                continue
            if module.weight.dtype != torch.float32:
                continue
            if type(module) is nn.Linear:
                module.__class__ = _RoutedLinear
            elif type(module) is not _RoutedLinear:
                self._needs_mode = True  # a subclass with its own forward: intercept its F.linear call
            known = self._entries.get(id(module.weight))
            if known is None or known.source != _source_key(module.weight, module.bias):
                self._prepare_layer(module)
        return self

    def _prepare_layer(self, module: nn.Linear) -> _Entry:
        source = _source_key(module.weight, module.bias)
        scale = None
        if self.config.weights == "bf16":
            kernel_w = _weight_copy(module, "bf16", _bf16_bits)
        elif self.config.weights == "int8":
            kernel_w, scale = _weight_copy(module, "int8", quantize_int8)
        else:
            exact = None
            if self.config.exact_bf16:
                exact = _weight_copy(module, "bf16-exact", _bf16_bits_if_exact)
            kernel_w = exact if exact is not None else module.weight.detach().contiguous().numpy()
        bias = module.bias.detach().contiguous().numpy() if module.bias is not None else None
        packed = bias_bf16 = qpacked = None
        if self.config.backend == "torch" and self.config.weights == "bf16":
            packed = _onednn_packed(torch.from_numpy(kernel_w).view(torch.bfloat16))
            bias_bf16 = torch.from_numpy(bias).to(torch.bfloat16) if bias is not None else None
        elif self.config.backend == "torch":  # one packed copy per layer, whatever the outlier_ratio
            qpacked = _weight_copy(
                module, "int8-packed", lambda _, q=kernel_w, s=scale, b=bias: _int8_packed(q, s, b)
            )
        inference = module.weight.is_inference() or (module.bias is not None and module.bias.is_inference())
        keep = (module.weight.detach(), None if module.bias is None else module.bias.detach())
        entry = _Entry(kernel_w, bias, source, packed, bias_bf16, scale, qpacked, module, inference, keep)
        old = self._weight_of.get(module)
        if old is not None and old != id(module.weight):  # the layer's previous weight object: its entry goes
            stale = self._entries.get(old)
            if stale is not None and stale.module is module:
                del self._entries[old]
        self._entries[id(module.weight)] = entry
        self._weight_of[module] = id(module.weight)
        return entry

    def _remade(self, module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> _Entry | None:
        """The entry for a layer this path prepared whose tensors changed since: its weight or bias changed
        in place or had its ``.data`` replaced, or its weight Parameter was replaced by another object (no
        entry under the new one's id); made again from the current tensors. None when the call's tensors
        are not that layer's or not ones the fast path takes (then the caller takes the plain path)."""
        if module not in self._weight_of or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        with _prepare_lock:
            if getattr(module, "weight", None) is not weight or getattr(module, "bias", None) is not bias:
                return None  # not this layer's tensors, or swapped by another thread
            known = self._entries.get(id(weight))
            if known is not None and known.module is module and known.source == _source_key(weight, bias):
                return known  # another thread made it meanwhile
            return self._prepare_layer(module)

    @property
    def exact_bf16_layers(self) -> int:
        """Layers whose kernel reads an exact bf16 copy of fp32 weights (``FastPathConfig.exact_bf16``)."""
        if self.config.weights != "fp32":
            return 0
        return sum(e.kernel_w.dtype == np.int16 for e in self._entries.values())

    @property
    def tag(self) -> str:
        """:attr:`FastPathConfig.tag`, plus how many layers read exact bf16 copies ("kernel/fp32+bf16x197"):
        their forwards cost less than fp32's, so cost curves are kept apart (cache keys, logs)."""
        exact = self.exact_bf16_layers
        return f"{self.config.tag}+bf16x{exact}" if exact else self.config.tag

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Route this thread's linear calls on the prepared weights through the fast path."""
        previous = getattr(_routing, "fast", None)
        _routing.fast = self
        try:
            if self._needs_mode:
                with _LinearMode(self):
                    yield
            else:
                yield
        finally:
            _routing.fast = previous

    def linear(
        self,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        module: nn.Module | None = None,
    ) -> torch.Tensor | None:
        """``F.linear(x, weight, bias)`` on the fast path, or None when this call is not one it serves.
        ``module``: the layer making the call, when known (a prepared layer whose weight was replaced by a
        new Parameter is then prepared again instead of falling back to the plain product for good)."""
        entry = self._entries.get(id(weight))
        if entry is None or entry.module.weight is not weight:  # none, or an id reused by another tensor
            entry = None if module is None else self._remade(module, weight, bias)
        if (
            entry is None
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        ):
            return None
        if entry.source != _source_key(weight, bias, entry.inference):  # changed since prepared
            entry = self._remade(entry.module, weight, bias)
            if entry is None:
                return None
        if entry.qpacked is not None:
            return _int8_activation_linear(x, weight, entry.qpacked, self.config.outlier_ratio)
        if self.config.backend == "torch":
            xb = x.to(torch.bfloat16)
            if entry.packed is not None:
                y = _packed_linear(xb, entry.packed, entry.bias_bf16)
            else:
                y = F.linear(xb, torch.from_numpy(entry.kernel_w).view(torch.bfloat16), entry.bias_bf16)
            return y.to(torch.float32)
        rows = x.numel() // x.shape[-1] if x.dim() else 0
        if not 0 < rows <= self.config.max_rows:
            return None
        out_features = entry.kernel_w.shape[0]
        x2 = x.reshape(rows, x.shape[-1]).contiguous()
        out = torch.empty(rows, out_features, dtype=torch.float32)
        _core.small_gemm(x2.numpy(), entry.kernel_w, entry.bias, out.numpy(), entry.scale)
        return out.view(*x.shape[:-1], out_features)


class _RoutedLinear(nn.Linear):
    """``nn.Linear`` that serves its call from the calling thread's active :class:`FastPath` when that
    path takes it (see :meth:`FastPath.linear`); otherwise exactly ``nn.Linear.forward``. Pickles and
    deep-copies as ``nn.Linear``, so a saved or copied model carries no trace of rasd."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        fast = getattr(_routing, "fast", None)
        if fast is not None:
            out = fast.linear(input, self.weight, self.bias, self)
            if out is not None:
                return out
        return F.linear(input, self.weight, self.bias)

    def __reduce_ex__(self, protocol: Any) -> Any:
        # Rebuilt as a plain nn.Linear from the standard library's reconstructor: no reference to rasd.
        return copyreg._reconstructor, (nn.Linear, object, None), self.__dict__


class _LinearMode(TorchFunctionMode):
    """Thread-local interception of ``F.linear`` for one FastPath (torch function modes live on a
    per-thread stack, so other threads are unaffected)."""

    def __init__(self, fast: FastPath) -> None:
        super().__init__()
        self.fast = fast

    def __torch_function__(self, func: Callable, types: Any, args: Sequence = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0]
            weight = args[1] if len(args) > 1 else kwargs["weight"]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            out = self.fast.linear(x, weight, bias)
            if out is not None:
                return out
        return func(*args, **kwargs)


@dataclass(frozen=True)
class ForwardPlan:
    """Which path runs a forward of n tokens, chosen once from measured whole-forward cost curves.

    paths:   the candidates: None (plain torch) and prepared :class:`FastPath` objects.
    curves:  measured cost per candidate (:class:`rasd.costmodel.CostCurve`), same order.
    threads: torch intra-op threads for the decode loop (None = leave torch as it is). With the native
             kernel in use, torch's OpenMP workers spin after each op and compete with the kernel's threads
             for the cores (0.5B at 4 tokens: 0.188 s per forward with torch at 2 threads, 0.099 s at 1), so
             small forwards run with torch at one thread; the curves were measured that way.
    Immutable; one plan per model and machine, shared by every request.
    """

    paths: tuple[FastPath | None, ...] = (None,)
    curves: tuple[Any, ...] = ()
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.curves and len(self.curves) != len(self.paths):
            raise ValueError("a ForwardPlan needs one cost curve per path")

    def path(self, rows: int, *, prefill: bool = False) -> FastPath | None:
        """The path with the lowest predicted cost for a forward over ``rows`` tokens. ``prefill``: only
        paths that take any row count (plain torch, backend "torch") and run at torch's full threads."""
        if not self.curves:
            return self.paths[0]
        best, best_cost = None, math.inf
        for fp, curve in zip(self.paths, self.curves, strict=True):
            if fp is not None and fp.config.backend == "kernel" and (prefill or rows > fp.config.max_rows):
                continue
            cost = curve(rows)
            if cost < best_cost:
                best, best_cost = fp, cost
        return best

    def cost(self, rows: int) -> float:
        """Predicted seconds of a forward over ``rows`` tokens on the path that will run."""
        if not self.curves:
            raise ValueError("this plan was not measured")
        return self.curves[self.paths.index(self.path(rows))](rows)

    def profile(self) -> dict[int, float]:
        """Predicted seconds at every measured size, on the path the plan runs there (the planner's T(n))."""
        return {n: self.cost(n) for n in sorted({n for curve in self.curves for n in curve.sizes})}

    def forward(self, rows: int, *, prefill: bool = False) -> contextlib.AbstractContextManager:
        """Context manager for one forward over ``rows`` tokens on the path :meth:`path` picks."""
        fp = self.path(rows, prefill=prefill)
        return fp.active() if fp is not None else contextlib.nullcontext()

    def decode_threads(self) -> contextlib.AbstractContextManager:
        """Torch threads for a whole decode loop (entered once per request; restored on exit)."""
        return torch_threads(self.threads)

    def names(self, sizes: Sequence[int]) -> dict[int, str]:
        """Which path runs each size ("torch", "kernel/fp32", "torch/bf16", ...), for logs and tests."""
        return {n: "torch" if (fp := self.path(n)) is None else fp.tag for n in sizes}


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` on the calling thread for the block, then restored (OpenMP
    thread counts are per thread); None leaves them as they are."""
    saved = torch.get_num_threads()
    if n is None or n == saved:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def allow_grouped_sdpa() -> None:
    """Let transformers' SDPA integration take grouped KV heads with a custom mask (CPU).

    With a custom 4D mask, transformers otherwise copies every key/value head group (``repeat_kv``) in every
    layer, which for a 1.5B GQA model at context 512 moves ~180 MB per verification forward; torch's CPU
    SDPA takes grouped heads with a mask directly, with the same result. transformers reads the switch from
    the environment on every call, so rasd sets it once, when a CPU fast path is first prepared, unless the
    user set it; it changes no output, only copies.
    """
    os.environ.setdefault(_GQA_ENV, "1")


def emulated_on_this_cpu(dtype: torch.dtype) -> bool:
    """Whether torch runs ``dtype`` matmuls on this CPU without native kernels (bf16/fp16 on AVX2-only CPUs,
    where oneDNN has no 16-bit path). False where it cannot tell."""
    probes = {torch.bfloat16: "_is_mkldnn_bf16_supported", torch.float16: "_is_mkldnn_fp16_supported"}
    if dtype not in probes:
        return False
    try:
        return torch.backends.mkldnn.is_available() and not getattr(torch.ops.mkldnn, probes[dtype])()
    except (AttributeError, RuntimeError):
        return False


def _weight_copy(module: nn.Linear, kind: str, convert: Callable[[torch.Tensor], Any]) -> Any:
    """``convert(module.weight)``, made once per layer and ``kind`` and shared by every FastPath; made again
    when the layer's weight or bias was replaced or changed in place (:func:`_source_key`), never served
    stale."""
    per_kind = _weight_copies.setdefault(module, {})
    source = _source_key(module.weight, module.bias)
    known = per_kind.get(kind)
    if known is None or known[0] != source:
        known = per_kind[kind] = (source, convert(module.weight))
    return known[1]


def _source_key(weight: torch.Tensor, bias: torch.Tensor | None, inference: bool = False) -> tuple[int, ...]:
    """What a prepared copy of a layer was made from: the storage of its weight and bias (a replaced
    tensor has another data_ptr) and their version counters (an in-place change, e.g. ``weight.mul_(2)``
    under ``no_grad``, bumps ``_version``). Not seen: writes through ``.data`` or a numpy view, which
    bump no counter, and any in-place change of an inference tensor (it keeps no counter): after those,
    call :func:`invalidate`. ``inference``: the layer's weight or bias was an inference tensor when last
    prepared (per linear call the plain key costs ~0.6 us; an ``is_inference()`` test per tensor doubles
    it, and a raised error costs ~10 us)."""
    if not inference:
        try:
            if bias is None:
                return (weight.data_ptr(), weight._version)
            return (weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)
        except RuntimeError:  # became an inference tensor since: the key below, which differs
            pass
    return (
        weight.data_ptr(),
        -1 if weight.is_inference() else weight._version,
        0 if bias is None else bias.data_ptr(),
        -1 if bias is None or bias.is_inference() else bias._version,
    )


def invalidate(model: nn.Module) -> None:
    """Make every prepared fast-path copy of ``model``'s weights again, now: needed only after changes the
    fast path cannot see (writes through ``.data`` or a numpy view of a weight, or in place to weights that
    are inference tensors); weights replaced or changed in place by torch ops are followed on their own."""
    with _prepare_lock:
        for module in model.modules():
            _weight_copies.pop(module, None)
        for path in _shared.get(model, {}).values():
            path._entries.clear()
            path.prepare()


def _bf16_bits(weight: torch.Tensor) -> np.ndarray:
    """``weight`` [out, in] rounded to bf16, as its int16 bit patterns (what the kernel reads)."""
    return weight.detach().to(torch.bfloat16).view(torch.int16).contiguous().numpy()


def _bf16_bits_if_exact(weight: torch.Tensor, chunk_elements: int = 1 << 22) -> np.ndarray | None:
    """``weight`` [out, in] as bf16 bit patterns when every value survives the round trip fp32 -> bf16 ->
    fp32 unchanged (NaN never does: such a layer stays fp32), else None. Checked in row chunks, so the
    check's temporaries stay small beside a large embedding matrix."""
    w = weight.detach()
    if w.dim() != 2 or w.numel() == 0:
        return None
    out = torch.empty(w.shape, dtype=torch.bfloat16)
    step = max(1, chunk_elements // max(1, w.shape[1]))
    for row in range(0, w.shape[0], step):
        part = w[row : row + step]
        rounded = part.to(torch.bfloat16)
        if not torch.equal(rounded.to(torch.float32), part):
            return None
        out[row : row + step] = rounded
    return out.view(torch.int16).numpy()


def quantize_int8(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-row int8 quantization of ``weight`` [out, in]: (q int8 [out, in], scale fp32 [out]) with
    ``weight[j] ~ scale[j] * q[j]``, q = round(weight / scale) in [-127, 127], scale = max |weight[j]| / 127
    (0 for an all-zero row, which then contributes exactly 0)."""
    w = weight.detach().to(torch.float32)
    scale = w.abs().amax(dim=1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous().numpy(), scale.contiguous().numpy()


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


def _int8_activation_linear(
    x: torch.Tensor, weight: torch.Tensor, qpacked: Any, ratio: float
) -> torch.Tensor:
    """``x @ weight.T + bias`` with int8 activations (7-bit, so AVX2's 16-bit pair sums never saturate) on
    the pre-packed int8 weight; with ``ratio``, the columns of ``x`` whose largest magnitude exceeds ``ratio``
    times the median column's are left out of the int8 product and multiplied by the fp32 weight instead."""
    x2 = x.reshape(-1, x.shape[-1])
    if ratio:
        peak = x2.abs().amax(dim=0)
        cols = torch.nonzero(peak > ratio * peak.median()).flatten()
    if not ratio or not len(cols):
        return torch.ops.quantized.linear_dynamic(x, qpacked, True)
    rest = x2.clone()
    rest[:, cols] = 0
    y = torch.ops.quantized.linear_dynamic(rest, qpacked, True)
    y.addmm_(x2[:, cols], weight[:, cols].t())
    return y.view(*x.shape[:-1], y.shape[-1])


@functools.cache
def int8_linear_available() -> bool:
    """Whether this torch build has the dynamically quantized int8 linear (``torch.ops.quantized``) that the
    ``backend="torch", weights="int8"`` path runs on, and it computes a small product right (probed once)."""
    ops = getattr(torch.ops, "quantized", None)
    try:
        if ops is None or not hasattr(ops, "linear_prepack") or not hasattr(ops, "linear_dynamic"):
            return False
        weight = torch.linspace(-1.0, 1.0, 48).reshape(6, 8)
        q, scale = quantize_int8(weight)
        x = torch.linspace(-2.0, 2.0, 24).reshape(3, 8)
        got = ops.linear_dynamic(x, _int8_packed(q, scale, np.ones(6, np.float32)), True)
        return bool(torch.allclose(got, F.linear(x, weight) + 1.0, rtol=0.05, atol=0.05))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _int8_packed(q: np.ndarray, scale: np.ndarray, bias: np.ndarray | None) -> Any:
    """int8 weights ``q`` [out, in] with per-row ``scale`` [out] (0 = an all-zero row) pre-packed for
    ``torch.ops.quantized.linear_dynamic``."""
    scales = torch.from_numpy(np.where(scale > 0, scale, 1.0).astype(np.float64))
    zero = torch.zeros(q.shape[0], dtype=torch.long)
    with warnings.catch_warnings():  # torch marks quantized tensor creation deprecated (it still works)
        warnings.simplefilter("ignore")
        weight = torch._make_per_channel_quantized_tensor(torch.from_numpy(q), scales, zero, 0)
        return torch.ops.quantized.linear_prepack(weight, None if bias is None else torch.from_numpy(bias))


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
