"""The native small-GEMM kernel and the fast path: exact to fp32 rounding, thread-local, patching nothing."""

import contextlib
import os
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rasd import _core
from rasd.fastpath import (
    FastPath,
    FastPathConfig,
    ForwardPlan,
    _bf16_bits_if_exact,
    _source_key,
    int8_linear_available,
    invalidate,
    torch_threads,
)
from rasd.testing import tiny_model


def _bf16_bits(w: np.ndarray) -> np.ndarray:
    return torch.from_numpy(w).to(torch.bfloat16).view(torch.int16).numpy()


@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    m=st.integers(1, 300),
    bias=st.booleans(),
    weights=st.sampled_from(["fp32", "bf16", "int8"]),
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(_core.small_gemm_isas()),
)
@settings(max_examples=180, deadline=None)
def test_small_gemm_matches_numpy_reference(n, k, m, bias, weights, seed, isa):
    # Every kernel this CPU can run (AVX-512, AVX2, the portable fallback), not only the default one, and
    # k not a multiple of the vector width (the tails), for each weight type.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32)
    w = rng.standard_normal((m, k), dtype=np.float32)
    b = rng.standard_normal(m, dtype=np.float32) if bias else None
    scale = None
    if weights == "bf16":
        kernel_w, ref_w = _bf16_bits(w), torch.from_numpy(w).to(torch.bfloat16).float().numpy()
    elif weights == "int8":
        kernel_w = rng.integers(-127, 128, (m, k), dtype=np.int8)
        scale = rng.uniform(0.0, 0.05, m).astype(np.float32)
        ref_w = kernel_w.astype(np.float64) * scale[:, None].astype(np.float64)
    else:
        kernel_w, ref_w = w, w
    out = np.empty((n, m), dtype=np.float32)
    _core.set_small_gemm_isa(isa)
    try:
        _core.small_gemm(x, kernel_w, b, out, scale)
    finally:
        _core.set_small_gemm_isa("auto")
    ref = x.astype(np.float64) @ ref_w.T.astype(np.float64) + (b if bias else 0)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.sqrt(k))


@given(
    n=st.integers(1, 40),
    k=st.integers(1, 70),
    m=st.integers(1, 300),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    isa=st.sampled_from(_core.small_gemm_isas()),
)
@settings(max_examples=60, deadline=None)
def test_small_gemm_on_bf16_valued_weights_equals_the_fp32_kernel_bit_for_bit(n, k, m, bias, seed, isa):
    # What FastPathConfig(exact_bf16=True) rests on, for every kernel this CPU can run: the bf16 copy of
    # weights that are bf16 values gives the fp32 kernel's outputs exactly (same products, same order).
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, k), dtype=np.float32)
    w = torch.from_numpy(rng.standard_normal((m, k), dtype=np.float32)).to(torch.bfloat16).float().numpy()
    b = rng.standard_normal(m, dtype=np.float32) if bias else None
    out32, out16 = np.empty((n, m), dtype=np.float32), np.empty((n, m), dtype=np.float32)
    _core.set_small_gemm_isa(isa)
    try:
        _core.small_gemm(x, w, b, out32)
        _core.small_gemm(x, _bf16_bits(w), b, out16)
    finally:
        _core.set_small_gemm_isa("auto")
    assert np.array_equal(out32, out16)


def test_small_gemm_uses_several_threads_consistently():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 1536), dtype=np.float32)
    w = rng.standard_normal((2000, 1536), dtype=np.float32)
    outs = []
    for threads in (1, 2, 3):
        _core.set_num_threads(threads)
        out = np.empty((5, 2000), dtype=np.float32)
        _core.small_gemm(x, w, None, out)
        outs.append(out)
    _core.set_num_threads(0)
    # Each output is computed by exactly one thread with the same instruction sequence: bitwise equal.
    assert all(np.array_equal(outs[0], o) for o in outs[1:])


def test_small_gemm_kernel_choice():
    isas = _core.small_gemm_isas()
    assert isas[-1] == "portable" and _core.small_gemm_isa() == isas[0]  # the best one by default
    with pytest.raises(ValueError, match="unknown kernel 'avx9'"):
        _core.set_small_gemm_isa("avx9")
    for missing in {"avx512", "avx2"} - set(isas):
        with pytest.raises(ValueError, match="not available"):
            _core.set_small_gemm_isa(missing)
    _core.set_small_gemm_isa("portable")
    assert _core.small_gemm_isa() == "portable"
    _core.set_small_gemm_isa("auto")
    assert _core.small_gemm_isa() == isas[0]


def test_small_gemm_refuses_wrong_arrays():
    x = np.zeros((2, 8), np.float32)
    w = np.zeros((4, 8), np.float32)
    out = np.zeros((2, 4), np.float32)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.small_gemm(x.astype(np.float64), w, None, out)
    with pytest.raises(ValueError, match="inner dimension"):
        _core.small_gemm(x, np.zeros((4, 7), np.float32), None, out)
    with pytest.raises(ValueError, match="shape"):
        _core.small_gemm(x, w, None, np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.small_gemm(np.zeros((8, 2), np.float32).T, w, None, out)
    q, scale = np.zeros((4, 8), np.int8), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="int8 weights need scale"):
        _core.small_gemm(x, q, None, out)
    with pytest.raises(ValueError, match="scale is for int8 weights only"):
        _core.small_gemm(x, w, None, out, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        _core.small_gemm(x, q, None, out, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="scale must be a C-contiguous"):
        _core.small_gemm(x, q, None, out, np.ones(4, np.float64))
    with pytest.raises(ValueError, match="w must be"):
        _core.small_gemm(x, np.zeros((4, 8), np.uint8), None, out, scale)


def _logits(model, ids, cache_len=0):
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fast_path_logits_match_stock_on_tiny_models(arch):
    model = tiny_model(arch, hidden_size=96)
    ids = torch.randint(2, 96, (1, 12))
    stock = _logits(model, ids)
    with FastPath.for_model(model).active():
        fast = _logits(model, ids)
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=1e-5)


def test_fast_path_is_thread_local_and_changes_no_state(monkeypatch):
    """Inside ``active()`` this thread's linear calls go to the kernel; no instance attribute, environment
    variable or thread count changes, and another thread running the same model at the same time runs the
    stock model."""
    model = tiny_model("qwen2")
    fast = FastPath.for_model(model)
    callers: list[int] = []
    kernel = _core.small_gemm
    monkeypatch.setattr(_core, "small_gemm", lambda *a: callers.append(threading.get_ident()) or kernel(*a))
    threads, env = torch.get_num_threads(), dict(os.environ)
    ids = torch.randint(2, 96, (1, 6))
    stock = _logits(model, ids)
    inside = threading.Event()
    release = threading.Event()
    other: dict[str, torch.Tensor] = {}

    def stock_thread() -> None:
        inside.wait()
        other["logits"] = _logits(model, ids)
        release.set()

    worker = threading.Thread(target=stock_thread)
    worker.start()
    with fast.active():
        inside.set()
        assert release.wait(30)
        assert not [m for m in model.modules() if "forward" in vars(m)]
        assert torch.get_num_threads() == threads and dict(os.environ) == env
        fast_logits = _logits(model, ids)
    worker.join()
    assert callers and set(callers) == {threading.get_ident()}
    assert torch.equal(other["logits"], stock)
    torch.testing.assert_close(fast_logits, stock, rtol=1e-4, atol=1e-5)
    callers.clear()
    _logits(model, ids)
    assert not callers  # nothing left behind after the context


def test_routed_layers_save_copy_and_pickle_as_plain_linear():
    """The routing class is invisible outside rasd: same state dict, and a deep copy or a pickle of the
    model holds plain ``nn.Linear`` layers that compute the same outputs."""
    import copy
    import pickle

    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    FastPath.for_model(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is not torch.nn.Linear for m in linears)  # routed
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    ids = torch.randint(2, 96, (1, 6))
    stock = _logits(model, ids)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(type(m) is torch.nn.Linear for m in clone.modules() if isinstance(m, torch.nn.Linear))
        assert torch.equal(_logits(clone, ids), stock)


def test_linear_subclasses_still_take_the_fast_path(monkeypatch):
    """An ``nn.Linear`` subclass keeps its class (its own forward may do more) and its F.linear call is
    still served by the kernel inside ``active()``."""

    class Scaled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * torch.nn.functional.linear(x, self.weight, self.bias)

    model = torch.nn.Sequential(Scaled(8, 4), torch.nn.Linear(4, 3))
    fast = FastPath.for_model(model)
    assert type(model[0]) is Scaled
    calls: list[int] = []
    kernel = _core.small_gemm
    monkeypatch.setattr(_core, "small_gemm", lambda *a: calls.append(a[1].shape[0]) or kernel(*a))
    x = torch.randn(2, 8)
    with torch.inference_mode():
        stock = model(x)
        with fast.active():
            got = model(x)
    assert sorted(calls) == [3, 4]
    torch.testing.assert_close(got, stock, rtol=1e-5, atol=1e-6)


def test_fast_path_leaves_training_and_large_inputs_to_torch():
    model = tiny_model("llama")
    lin = model.lm_head
    with FastPath.for_model(model, FastPathConfig(max_rows=4)).active():
        x = torch.randn(1, 3, lin.in_features, requires_grad=True)
        y = lin(x)  # grad required: must go through autograd-aware F.linear
        assert y.requires_grad
        y.sum().backward()
        assert x.grad is not None
        big = torch.randn(9, lin.in_features)
        torch.testing.assert_close(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))


def test_a_replaced_weight_is_never_served_stale():
    model = tiny_model("llama")
    fast = FastPath.for_model(model)
    lin = model.lm_head
    x = torch.randn(2, lin.in_features)
    with torch.inference_mode():
        lin.weight.data = lin.weight.data * 2  # a new tensor: the prepared copy no longer applies
        with fast.active():
            got = lin(x)
    torch.testing.assert_close(got, torch.nn.functional.linear(x, lin.weight), rtol=1e-4, atol=1e-5)


STALE_CONFIGS = [
    FastPathConfig(),
    FastPathConfig(weights="bf16"),
    FastPathConfig(weights="int8"),
    FastPathConfig(weights="bf16", backend="torch"),
    pytest.param(
        FastPathConfig(weights="int8", backend="torch", outlier_ratio=6.0),
        marks=pytest.mark.skipif(not int8_linear_available(), reason="no dynamically quantized int8 linear"),
    ),
]


@pytest.mark.parametrize("config", STALE_CONFIGS, ids=lambda c: c.tag)
def test_a_weight_or_bias_changed_in_place_or_replaced_is_never_served_stale(config):
    """Every fast path's prepared copy (int8 and bf16 weights, the packed int8 layer with its bias) answers
    only for the tensors it was made from: a weight scaled in place, a bias shifted in place and a bias
    replaced each give the current layer's product (a stale copy is off by the whole change), and the
    layer's copy is made again from them (the fast path keeps serving it, not the plain product)."""
    model = tiny_model("qwen2", seed=3)  # q_proj has a bias
    fast = FastPath.for_model(model, config)
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))

    def check() -> None:
        with torch.inference_mode(), fast.active():
            got = lin(x)
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
        assert (got - want).abs().max() < 0.05 * want.abs().max()
        assert fast._entries[id(lin.weight)].source == _source_key(lin.weight, lin.bias)

    check()
    with torch.no_grad():
        lin.weight.mul_(3.0)
    check()
    with torch.no_grad():
        lin.bias.add_(10.0)
    check()
    lin.bias.data = lin.bias.data - 20.0
    check()


@pytest.mark.parametrize("config", STALE_CONFIGS, ids=lambda c: c.tag)
def test_a_weight_parameter_replaced_by_a_new_object_is_prepared_again(config):
    """``layer.weight = nn.Parameter(...)`` leaves the prepared entry keyed by the old Parameter: the layer
    is prepared again on its next call (the fast path keeps serving it with the new weight's product, not
    the plain one) and the old entry, which holds the old weight's memory, is dropped."""
    model = tiny_model("qwen2", seed=7)
    fast = FastPath.for_model(model, config)
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(3))
    old = id(lin.weight)
    lin.weight = torch.nn.Parameter(lin.weight.detach() * -2.0)
    entries = len(fast._entries)
    with torch.inference_mode(), fast.active():
        got = lin(x)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert (got - want).abs().max() < 0.05 * want.abs().max()
    assert fast._entries[id(lin.weight)].module is lin and old not in fast._entries  # (made by this call)
    assert len(fast._entries) == entries


@pytest.mark.parametrize("config", STALE_CONFIGS, ids=lambda c: c.tag)
def test_invalidate_follows_writes_no_version_counter_sees(config):
    """A write through ``.data`` bumps no version counter, so the prepared copy cannot notice it (the
    documented limit); :func:`rasd.fastpath.invalidate` makes every copy again, shared ones included."""
    model = tiny_model("qwen2", seed=5)
    fast = FastPath.for_model(model, config)
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode(), fast.active():
        lin(x)
    lin.weight.data.mul_(-2.0)
    invalidate(model)
    with torch.inference_mode(), fast.active():
        got = lin(x)
    want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def _round_to_bf16(model: torch.nn.Module) -> torch.nn.Module:
    """The model a bf16 checkpoint loaded in fp32 is: every weight a bf16 value."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def _verify_logits(model, plan: ForwardPlan, seed: int = 0) -> torch.Tensor:
    from rasd.tree import TokenTree
    from rasd.verify import TargetSession

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 96, (1, 9), generator=gen)
    parents = [-1, 0, 0, 1, 2, -1, 5, 3, 6, 1, -1, 10]  # a tree: siblings, several roots, depth 4
    tree = TokenTree(torch.randint(2, 96, (len(parents),), generator=gen).numpy(), np.array(parents))
    return TargetSession(model, ids, plan=plan).verify(tree)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_exact_bf16_weights_give_the_fp32_kernels_logits_bit_for_bit(arch):
    """A model whose fp32 weights are all bf16 values (a bf16 checkpoint loaded in fp32): the default fp32
    path reads bf16 copies of every layer (half the bytes) and the verification logits equal the fp32
    kernel's bit for bit, on a tree with siblings at every depth; a model with one weight off the bf16
    grid keeps that layer (only) in fp32, still bit-identical."""
    model = _round_to_bf16(tiny_model(arch, hidden_size=96, seed=11))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    exact = FastPath.for_model(model)
    fp32 = FastPath.for_model(model, FastPathConfig(exact_bf16=False))
    want = _verify_logits(model, ForwardPlan(paths=(fp32,)))
    got = _verify_logits(model, ForwardPlan(paths=(exact,)))
    assert exact.exact_bf16_layers == len(linears) and fp32.exact_bf16_layers == 0
    assert exact.tag == f"kernel/fp32+bf16x{len(linears)}" and fp32.tag == "kernel/fp32"
    assert torch.equal(got, want)
    stock = _verify_logits(model, ForwardPlan())
    torch.testing.assert_close(got, stock, rtol=1e-4, atol=1e-5)

    odd = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        odd.weight[3, 5] = 1.0 + 2.0**-12  # needs 13 mantissa bits: not a bf16 value
    got = _verify_logits(model, ForwardPlan(paths=(exact,)))
    assert torch.equal(got, _verify_logits(model, ForwardPlan(paths=(fp32,))))
    assert exact.exact_bf16_layers == len(linears) - 1
    assert exact._entries[id(odd.weight)].kernel_w.dtype == np.float32


def test_an_exact_bf16_layer_changed_off_the_grid_is_never_served_its_bf16_copy():
    """In-place changes that leave the bf16 grid (x 1.1) make the layer fp32 again; a change back onto it
    (x -2 of a bf16 value stays one) makes a new bf16 copy: the product is always the current weight's."""
    model = _round_to_bf16(tiny_model("qwen2", seed=3))
    fast = FastPath.for_model(model)
    lin = model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(0))
    reference = FastPath.for_model(model, FastPathConfig(exact_bf16=False))

    def check(kind) -> None:
        with torch.inference_mode(), fast.active():
            got = lin(x)
        with torch.inference_mode(), reference.active():
            want = lin(x)
        assert torch.equal(got, want)
        assert fast._entries[id(lin.weight)].kernel_w.dtype == kind

    check(np.int16)
    with torch.no_grad():
        lin.weight.mul_(1.1)
    check(np.float32)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.to(torch.bfloat16).float() * -2.0)
    check(np.int16)


def test_bf16_exactness_check():
    w = torch.randn(37, 11).to(torch.bfloat16).float()
    w[0, 0], w[1, 1], w[2, 2] = -0.0, float("inf"), 2.0**-130  # signed zero, infinity, a bf16 subnormal
    bits = _bf16_bits_if_exact(w, chunk_elements=16)  # chunks of one row: every chunk is checked
    assert bits is not None and torch.equal(torch.from_numpy(bits).view(torch.bfloat16).float(), w)
    assert torch.signbit(torch.from_numpy(bits).view(torch.bfloat16)[0, 0])
    last = w.clone()
    last[36, 10] += 2.0**-20 * last[36, 10].abs().clamp(min=1)  # off the grid in the last chunk only
    assert _bf16_bits_if_exact(last, chunk_elements=16) is None
    nan = w.clone()
    nan[5, 5] = float("nan")
    assert _bf16_bits_if_exact(nan) is None  # NaN never compares equal: that layer stays fp32
    assert _bf16_bits_if_exact(torch.zeros(0, 4)) is None


def test_a_model_made_under_inference_mode_takes_the_fast_path():
    """Weights that are inference tensors keep no version counter: their entries are keyed without it (and
    without a raised error per call), and a replaced one is still followed."""
    with torch.inference_mode():
        model = tiny_model("qwen2", seed=6)
    fast = FastPath.for_model(model, FastPathConfig(weights="int8"))
    lin = model.model.layers[0].self_attn.q_proj
    assert lin.weight.is_inference() and fast._entries[id(lin.weight)].inference
    x = torch.randn(3, lin.in_features, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        with fast.active():
            got = lin(x)
        assert not torch.equal(got, torch.nn.functional.linear(x, lin.weight, lin.bias))  # int8, not plain
        lin.weight.data = lin.weight.data * 3
        with fast.active():
            got = lin(x)
        want = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert (got - want).abs().max() < 0.05 * want.abs().max()


def test_a_prepared_model_is_freed_once_its_user_drops_it():
    """The shared registry of prepared paths is keyed weakly by the model; a path must not hold the model
    strongly either, or every model ever prepared (and its converted weight copies) stays in memory."""
    import gc
    import weakref

    model = tiny_model("qwen2", seed=4)
    for config in STALE_CONFIGS[:3]:
        with torch.inference_mode(), FastPath.for_model(model, config).active():
            model(torch.tensor([[1, 2, 3]]))
    alive = weakref.ref(model)
    del model
    gc.collect()
    assert alive() is None


def test_config_validation():
    with pytest.raises(ValueError, match="weights"):
        FastPathConfig(weights="int4")
    with pytest.raises(ValueError, match="max_rows"):
        FastPathConfig(max_rows=0)
    with pytest.raises(ValueError, match="backend"):
        FastPathConfig(weights="bf16", backend="onnx")
    with pytest.raises(ValueError, match="needs weights='bf16' or 'int8'"):
        FastPathConfig(backend="torch")
    with pytest.raises(ValueError, match="outlier_ratio must be"):
        FastPathConfig(weights="int8", backend="torch", outlier_ratio=0.5)
    with pytest.raises(ValueError, match="applies to int8 activations"):
        FastPathConfig(weights="int8", outlier_ratio=6.0)
    assert FastPathConfig(weights="int8", backend="torch", outlier_ratio=6.0).tag == "torch/int8-outliers6"


def _dequantized(entry) -> torch.Tensor:
    """The fp32 weight [out, in] an int8 fast-path entry stands for: its int8 rows times their scales."""
    return torch.from_numpy(entry.kernel_w.astype(np.float32) * entry.scale[:, None])


needs_int8_linear = pytest.mark.skipif(
    not int8_linear_available(), reason="this torch build has no dynamically quantized int8 linear"
)


def _activation_error_bound(x: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    """Per output, the most that quantizing ``x`` [rows, in] to 128 levels over its range can move
    ``x @ deq.T``: half a step per input times the row's absolute weights."""
    step = (torch.clamp(x.max(), min=0) - torch.clamp(x.min(), max=0)) / 127
    return step / 2 * deq.abs().sum(dim=1) + 1e-5


@needs_int8_linear
def test_int8_activation_path_serves_every_row_count_within_the_activation_rounding():
    """backend="torch" with int8 weights: every row count (prefill sizes included) is served by torch's
    dynamically quantized linear on the same int8 copy as the kernel path; the result differs from the
    dequantized-weight product by at most the activations' rounding (7-bit, per call), and is not the
    exact fp32 product; outside the context the layer is exact."""
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    kernel = FastPath.for_model(model, FastPathConfig(weights="int8", max_rows=8))
    act = FastPath.for_model(model, FastPathConfig(weights="int8", backend="torch"))
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    entry = act._entries[id(lin.weight)]
    assert entry.kernel_w is kernel._entries[id(lin.weight)].kernel_w  # one int8 copy per layer
    deq = _dequantized(entry)
    for rows in (1, 5, 300):
        x = torch.randn(rows, lin.in_features)
        with torch.inference_mode():
            with act.active():
                got = lin(x)
            exact = lin(x)
        dequantized = torch.nn.functional.linear(x, deq, lin.bias)
        assert got.shape == exact.shape and got.dtype == torch.float32
        assert ((got - dequantized).abs() <= _activation_error_bound(x, deq)).all()
        assert not torch.allclose(got, dequantized, rtol=0, atol=1e-6)  # the activations were quantized
        torch.testing.assert_close(exact, torch.nn.functional.linear(x, lin.weight, lin.bias))


@needs_int8_linear
def test_int8_activation_outlier_columns_are_multiplied_in_fp32():
    """With outlier_ratio, an input column far beyond the median column's magnitude is left out of the int8
    product and multiplied exactly: the error is bounded by the other columns' rounding (what one scale per
    tensor would otherwise spread over every column), and that column's contribution is exact."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(64, 48)
    model = torch.nn.Sequential(lin)
    plain = FastPath(model, FastPathConfig(weights="int8", backend="torch")).prepare()
    split = FastPath(model, FastPathConfig(weights="int8", backend="torch", outlier_ratio=6.0)).prepare()
    entry = split._entries[id(lin.weight)]
    deq = _dequantized(entry)
    x = torch.randn(40, 64)
    x[:, 7] *= 400.0  # one "massive activation" column
    rest = x.clone()
    rest[:, 7] = 0
    want = torch.nn.functional.linear(rest, deq, lin.bias) + x[:, 7:8] * lin.weight[:, 7].detach()
    with torch.inference_mode():
        with plain.active():
            one_scale = lin(x)
        with split.active():
            got = lin(x)
    err_split = (got - want).abs()
    assert (err_split <= _activation_error_bound(rest, deq)).all()
    err_plain = (one_scale - torch.nn.functional.linear(x, deq, lin.bias)).abs()
    assert err_plain.mean() > 20 * err_split.mean()
    # A call with no outlying column is the plain int8 product.
    calm = torch.randn(40, 64)
    with torch.inference_mode():
        with plain.active():
            a = lin(calm)
        with split.active():
            b = lin(calm)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_torch_bf16_backend_computes_bf16_products_on_the_shared_copy():
    """backend="torch": every row count (prefill sizes included) goes to torch's bf16 matmul on the same
    bf16 weight copy the kernel path uses (one copy per model), the outputs are fp32, and leaving the
    context restores the exact fp32 layers."""
    torch.manual_seed(0)
    model = tiny_model("qwen2")
    kernel = FastPath.for_model(model, FastPathConfig(weights="bf16", max_rows=8))
    torch_path = FastPath.for_model(model, FastPathConfig(weights="bf16", backend="torch"))
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    assert kernel._entries[id(lin.weight)].kernel_w is torch_path._entries[id(lin.weight)].kernel_w
    w16, b16 = lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()
    threads = torch.get_num_threads()
    for rows in (1, 5, 300):
        x = torch.randn(rows, lin.in_features)
        with torch.inference_mode():
            with torch_path.active():
                assert torch.get_num_threads() == threads  # torch keeps its own threads
                got = lin(x)
            exact = lin(x)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, torch.nn.functional.linear(x.bfloat16(), w16, b16).float())
        torch.testing.assert_close(exact, torch.nn.functional.linear(x, lin.weight, lin.bias))
    # Where oneDNN has a bf16 linear on this CPU, the bf16 copies are handed to it pre-packed (once, not per
    # call); where it has none (an AVX2-only CPU: no avx512bw/vl/dq, no avx_ne_convert), none is packed and
    # the plain bf16 F.linear above serves every call.
    packed = [entry.packed for entry in torch_path._entries.values()]
    assert len(packed) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        assert all(p is not None and p.is_mkldnn for p in packed)
    else:
        assert all(p is None for p in packed)
    torch_path.prepare()
    again = [entry.packed for entry in torch_path._entries.values()]
    assert all(a is b for a, b in zip(again, packed, strict=True))


@pytest.mark.real_model
def test_fast_path_logits_match_stock_on_qwen(qwen_draft):
    model, tokenizer = qwen_draft
    ids = tokenizer("def fibonacci(n):\n    ", return_tensors="pt").input_ids
    from rasd.tree import TokenTree
    from rasd.verify import TargetSession

    tree = TokenTree.chain([262, 470, 308, 220, 16, 25, 198, 286, 470, 308, 279, 16, 8, 488, 15801])
    stock = TargetSession(model, ids).verify(tree)
    kernel_only = ForwardPlan(paths=(FastPath.for_model(model),))
    fast = TargetSession(model, ids, plan=kernel_only).verify(tree)
    torch.testing.assert_close(fast, stock, rtol=1e-4, atol=2e-4)
    assert torch.equal(fast.argmax(-1), stock.argmax(-1))


@pytest.mark.real_model
def test_bf16_draft_weights_stay_close(qwen_draft):
    model, tokenizer = qwen_draft
    ids = tokenizer("import os\nimport sys\n", return_tensors="pt").input_ids
    stock = _logits(model, ids)
    with FastPath.for_model(model, FastPathConfig(weights="bf16", max_rows=64)).active():
        approx = _logits(model, ids)
    with FastPath.for_model(model, FastPathConfig(weights="bf16", backend="torch")).active():
        torch_bf16 = _logits(model, ids)
    # bf16 weights are for draft models only: close, not exact.
    for logits in (approx, torch_bf16):
        agree = (logits.argmax(-1) == stock.argmax(-1)).float().mean()
        assert agree >= 0.8


def test_int8_weights_quantize_per_row_and_serve_the_dequantized_product():
    """weights="int8" (drafts only): each row is round(w / s) with s = max|w_row| / 127, an all-zero row
    stays exactly zero, and a routed layer computes x @ (s * q).T + bias to fp32 rounding, for every row
    count the kernel takes; larger inputs and the layers outside the context stay exact fp32."""
    from rasd.fastpath import quantize_int8

    torch.manual_seed(0)
    w = torch.randn(7, 33)
    w[3] = 0
    q, scale = quantize_int8(w)
    assert q.dtype == np.int8 and scale.dtype == np.float32 and q.shape == (7, 33) and scale.shape == (7,)
    for j in range(7):
        s_ref = float(w[j].abs().max()) / 127
        assert scale[j] == pytest.approx(s_ref, rel=1e-6)
        if s_ref:
            assert np.array_equal(q[j], np.clip(np.round(w[j].numpy() / scale[j]), -127, 127).astype(np.int8))
            assert np.abs(q[j]).max() == 127
    assert not q[3].any() and scale[3] == 0
    assert np.abs(q.astype(np.float32) * scale[:, None] - w.numpy()).max() <= scale.max() / 2 + 1e-6

    model = tiny_model("qwen2")
    fast = FastPath.for_model(model, FastPathConfig(weights="int8", max_rows=8))
    assert fast.config.tag == "kernel/int8"
    lin = next(m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    entry = fast._entries[id(lin.weight)]
    deq = _dequantized(entry)
    for rows in (1, 3, 8):
        x = torch.randn(rows, lin.in_features)
        with torch.inference_mode():
            with fast.active():
                got = lin(x)
            exact = lin(x)
        torch.testing.assert_close(got, torch.nn.functional.linear(x, deq, lin.bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(exact, torch.nn.functional.linear(x, lin.weight, lin.bias))
        assert not torch.equal(got, exact)  # really the quantized weights, not the fp32 ones
    big = torch.randn(9, lin.in_features)
    with torch.inference_mode(), fast.active():
        torch.testing.assert_close(lin(big), torch.nn.functional.linear(big, lin.weight, lin.bias))


@pytest.mark.real_model
def test_int8_draft_predicts_like_the_fp32_draft_on_real_text(qwen_draft):
    """The int8 copy of the real 0.5B draft, teacher-forced over real text, picks the same top-1 next token
    as its fp32 weights almost everywhere: the precision a draft gives up costs little acceptance."""
    model, tokenizer = qwen_draft
    from rasd import data

    code = next(iter(data.stdlib_code(max_files=1))).text
    reply = next(c for c in data.sharegpt(limit=50) if len(c.messages) > 1).messages[1][1]
    fast = FastPath.for_model(model, FastPathConfig(weights="int8", max_rows=256))
    for text in (code, reply):
        ids = tokenizer(text, return_tensors="pt").input_ids[:, :256]
        with torch.inference_mode():
            exact = model(ids).logits[0].argmax(-1)
            with fast.active():
                quantized = model(ids).logits[0].argmax(-1)
        agree = (exact == quantized).float().mean().item()
        assert ids.shape[1] >= 128 and agree >= 0.97, (ids.shape, agree)


@needs_int8_linear
@pytest.mark.real_model
def test_int8_activation_prefill_leaves_the_real_drafts_predictions_as_after_fp32(qwen_draft):
    """The draft's int8-activation path (what its plan picks for a long prefill) on the real 0.5B: after
    prefilling 400 tokens of real code or chat through it, the draft (decoding on its weight-only int8
    kernel, as it drafts) predicts a 40-token continuation as after an fp32 prefill, and teacher-forced over
    256 tokens its top-1 matches the fp32 forward's at >= 85 % of positions (measured 0.89-0.95), which
    the outlier columns are needed for (every column in int8: 0.70-0.77)."""
    model, tokenizer = qwen_draft
    from rasd import data
    from rasd.drafting.draft_model import INT8_OUTLIER_RATIO
    from rasd.lean import LeanDecoder

    code = "\n".join(doc.text for doc in data.stdlib_code(max_files=3))
    chat = "\n".join(m[1] for c in data.sharegpt(limit=50) for m in c.messages)
    lean = LeanDecoder(model)
    kernel = FastPath.for_model(model, FastPathConfig(weights="int8", max_rows=64))
    split = FastPath.for_model(
        model, FastPathConfig(weights="int8", backend="torch", outlier_ratio=INT8_OUTLIER_RATIO)
    )
    one_scale = FastPath.for_model(model, FastPathConfig(weights="int8", backend="torch"))

    def continuation(prompt: list[int], prefill: FastPath | None, forced: list[int] | None) -> list[int]:
        cache = lean.new_cache()
        with torch.inference_mode():
            with prefill.active() if prefill is not None else contextlib.nullcontext():
                lean.forward(prompt[:-1], cache, logits="none")
            out, token = [], prompt[-1]
            for i in range(40):
                with torch_threads(1), kernel.active():  # as the draft decodes (no OpenMP spin-wait)
                    out.append(int(lean.forward([token], cache, logits="all")[-1].argmax()))
                token = forced[i] if forced is not None else out[-1]
        return out

    for text in (code, chat):
        ids = tokenizer(text).input_ids
        prompt = ids[:400]
        assert len(prompt) == 400
        reference = continuation(prompt, None, None)
        got = continuation(prompt, split, reference)
        assert sum(a == b for a, b in zip(got, reference, strict=True)) >= 38, (got, reference)
        window = torch.tensor([ids[:256]])
        with torch.inference_mode():
            exact = model(window).logits[0].argmax(-1)
            agree = {}
            for name, fp in (("split", split), ("one_scale", one_scale)):
                with fp.active():
                    agree[name] = (model(window).logits[0].argmax(-1) == exact).float().mean().item()
        assert agree["split"] >= 0.85 and agree["one_scale"] < agree["split"], agree


@pytest.mark.parametrize("emulated", [True, False])
def test_draft_paths_leave_out_torch_bf16_where_the_cpu_emulates_it(monkeypatch, emulated):
    """A draft is offered torch's bf16 matmul beside its kernel only where this CPU has native bf16 matmuls;
    on an AVX2-only CPU that path never wins and its bf16 weight copy would be memory for nothing."""
    from rasd.drafting import draft_model
    from rasd.drafting.draft_model import DraftTreeConfig, draft_fast_paths

    monkeypatch.setattr(draft_model, "emulated_on_this_cpu", lambda dtype: emulated)
    monkeypatch.setattr(draft_model, "int8_linear_available", lambda: True)
    model = tiny_model("qwen2")
    for weights in ("int8", "bf16", "fp32"):
        tags = [fp.config.tag for fp in draft_fast_paths(model, DraftTreeConfig(weights=weights))]
        int8_act = ["torch/int8-outliers6"] if weights == "int8" else []
        bf16 = ["torch/bf16"] if weights != "fp32" and not emulated else []
        assert tags == [f"kernel/{weights}", *int8_act, *bf16]
    # int8 activations only when asked for and where torch has the op.
    no_act = draft_fast_paths(model, DraftTreeConfig(int8_activations=False))
    assert "torch/int8-outliers6" not in [fp.config.tag for fp in no_act]
    monkeypatch.setattr(draft_model, "int8_linear_available", lambda: False)
    assert "torch/int8-outliers6" not in [fp.config.tag for fp in draft_fast_paths(model, DraftTreeConfig())]


@pytest.mark.real_model
def test_exact_bf16_target_on_a_real_bf16_valued_model_is_token_identical():
    """SmolLM2-135M rounded to bf16 (what its bf16 checkpoint loaded in fp32 is) as a target: the generator's
    fast path reads exact bf16 copies of every linear layer, its verification logits on real code equal the
    fp32 kernel's bit for bit, and greedy output equals HF ``generate`` on held-out code and chat prompts."""
    from rasd import models, tasks
    from rasd.generate import SpeculativeGenerator
    from rasd.tree import TokenTree
    from rasd.verify import TargetSession

    model, tokenizer = models.load_model("smollm2-135m")  # a private copy: rounded below
    _round_to_bf16(model)
    gen = SpeculativeGenerator(model, tokenizer=tokenizer, prompt_lookup=True, recycling=True)
    exact = next(fp for fp in gen.plan.paths if fp is not None)
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert exact.exact_bf16_layers == linears and exact.tag.endswith(f"+bf16x{linears}")

    ids = tokenizer("def fibonacci(n):\n    if n < 2:\n        return n\n", return_tensors="pt").input_ids
    tree = TokenTree(np.array([262, 470, 308, 220, 16, 25, 198]), np.array([-1, 0, 1, -1, 3, 2, 5]))
    fp32 = FastPath.for_model(model, FastPathConfig(exact_bf16=False))
    got = TargetSession(model, ids, plan=ForwardPlan(paths=(exact,))).verify(tree)
    want = TargetSession(model, ids, plan=ForwardPlan(paths=(fp32,))).verify(tree)
    assert torch.equal(got, want)

    prompts = [p.render(tokenizer) for f in ("code", "chat") for p in tasks.prompts(f, "test", 2)]
    for prompt in prompts:
        x = torch.tensor([prompt])
        with torch.inference_mode():
            hf = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=40, do_sample=False)
        ours = gen.generate(prompt, max_new_tokens=40, do_sample=False)
        assert ours.sequences[0].tolist() == hf[0].tolist()


def test_a_generators_target_path_must_be_exact():
    from rasd.generate import SpeculativeGenerator

    model = tiny_model("qwen2", seed=2)
    for config in (FastPathConfig(weights="bf16"), FastPathConfig(weights="int8", backend="torch")):
        with pytest.raises(ValueError, match="the target's fast path must be exact"):
            SpeculativeGenerator(model, fast_path=config)
    config = FastPathConfig(exact_bf16=False, max_rows=16)
    gen = SpeculativeGenerator(model, fast_path=config)
    assert [fp.config for fp in gen.plan.paths if fp is not None] == [config]
