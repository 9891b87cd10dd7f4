"""A lean forward of Llama-style decoders (Qwen2, Llama) for the small forwards of speculative decoding.

The draft model runs a few tokens per forward, many times a step, and the target verifies a small tree per
step; on a CPU much of such a forward outside the weight stream is per-op overhead. Hugging Face's forward
of the Qwen2.5 0.5B draft, one token at context 300 on a 2-core EPYC with int8 weights on the native
kernel, took ~50 ms: the linear layers ~25 ms, torch ops ~11 ms (the KV cache's ``cat`` per layer, rotary
embeddings per layer, RMSNorm in five ops) and ~13 ms Python (module calls, cache and mask bookkeeping).
:class:`LeanDecoder` runs the same arithmetic on the same modules with fewer steps: a preallocated KV cache
written in place, one rotary table per forward, ``F.rms_norm``, no per-layer module calls, and the caller's
4-D additive mask used as given. Linear layers still go through the modules' ``forward``, so the active
:class:`rasd.fastpath.FastPath` serves them.

The draft model and the target's :class:`rasd.verify.TargetSession` use it on fp32 CPU models. It computes
what the model's own forward computes, op for op (the logits came out bit-identical on the real Qwen 0.5B;
the tests hold it to Hugging Face's on random trees, crops and cache growth), so verification through it is
exactly as lossless as through the model's forward.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# Decoder layers whose forward is exactly: pre-norm attention with q/k/v/o projections and rotary
# embeddings (rotate-half form), then pre-norm SiLU-gated MLP; RMSNorm with a weight, no extra norms.
_SUPPORTED_LAYERS = {"Qwen2DecoderLayer", "LlamaDecoderLayer"}


def lean_supported(model: nn.Module) -> bool:
    """Whether :class:`LeanDecoder` reproduces ``model``'s forward: a CPU Qwen2 or Llama causal LM with SiLU
    MLPs, full attention in every layer, and the standard rotary embedding module."""
    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if inner is None or config is None or not hasattr(model, "lm_head"):
        return False
    layers = getattr(inner, "layers", None)
    if not layers or any(type(layer).__name__ not in _SUPPORTED_LAYERS for layer in layers):
        return False
    if getattr(config, "hidden_act", None) != "silu" or not hasattr(inner, "rotary_emb"):
        return False
    if any(t != "full_attention" for t in (getattr(config, "layer_types", None) or [])):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", False):
        return False
    attn = layers[0].self_attn
    projections = all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    return projections and not hasattr(attn, "q_norm")


def lean_applies(model: nn.Module) -> bool:
    """Whether rasd runs ``model``'s forwards on :class:`LeanDecoder` (unless told not to): a supported model
    (:func:`lean_supported`) in float32 on a CPU, where the per-op overhead it removes matters."""
    param = next(model.parameters())
    return param.device.type == "cpu" and param.dtype == torch.float32 and lean_supported(model)


class LeanCache:
    """Key/value cache of a :class:`LeanDecoder`: per layer, preallocated [rows, kv_heads, capacity, head_dim]
    tensors written in place (capacity doubles when full); every row holds ``length`` columns. What rasd
    uses of a ``DynamicCache``: :meth:`get_seq_length`, :meth:`crop`, :meth:`batch_select_indices` and
    :attr:`layers` (views that KV compaction writes through)."""

    def __init__(
        self,
        layers: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        *,
        rows: int = 1,
        capacity: int = 256,
    ) -> None:
        self.length = 0
        self.rows = rows
        self._shape = (kv_heads, head_dim)
        self._dtype, self._device = dtype, device
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._layers = layers
        self._grow(max(capacity, 1))

    @classmethod
    def from_layers(cls, layers: list[tuple[torch.Tensor, torch.Tensor]], *, room: int = 256) -> LeanCache:
        """A cache holding copies of per-layer (keys, values) [rows, kv_heads, length, head_dim], with room
        for ``room`` more columns."""
        k0 = layers[0][0]
        rows, kv, length, dim = k0.shape
        cache = cls(len(layers), kv, dim, k0.dtype, k0.device, rows=rows, capacity=length + room)
        for i, (k, v) in enumerate(layers):
            cache.keys[i][:, :, :length] = k
            cache.values[i][:, :, :length] = v
        cache.length = length
        return cache

    def _grow(self, capacity: int) -> None:
        kv, dim = self._shape
        keys, values = [], []
        for i in range(self._layers):
            k = torch.empty(self.rows, kv, capacity, dim, dtype=self._dtype, device=self._device)
            v = torch.empty_like(k)
            if self.keys:
                k[:, :, : self.length] = self.keys[i][:, :, : self.length]
                v[:, :, : self.length] = self.values[i][:, :, : self.length]
            keys.append(k)
            values.append(v)
        self.keys, self.values = keys, values

    def reserve(self, tokens: int) -> None:
        """Room for ``tokens`` more entries."""
        capacity = self.keys[0].shape[2]
        if self.length + tokens > capacity:
            while capacity < self.length + tokens:
                capacity *= 2
            self._grow(capacity)

    def get_seq_length(self) -> int:
        return self.length

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep the rows ``indices`` [r] (in that order), as DynamicCache's method of the same name."""
        self.keys = [k.index_select(0, indices) for k in self.keys]
        self.values = [v.index_select(0, indices) for v in self.values]
        self.rows = int(indices.numel())

    @property
    def layers(self) -> list[SimpleNamespace]:
        """Per layer, ``keys`` and ``values`` [rows, kv_heads, length, head_dim] views."""
        return [
            SimpleNamespace(keys=k[:, :, : self.length], values=v[:, :, : self.length])
            for k, v in zip(self.keys, self.values, strict=True)
        ]

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` entries (negative: drop that many from the end), as DynamicCache."""
        self.length = max(0, self.length + max_length if max_length < 0 else min(max_length, self.length))


class LeanDecoder:
    """The forward of a supported model (:func:`lean_supported`) on its own modules and a :class:`LeanCache`.

    >>> lean = LeanDecoder(model)
    >>> cache = lean.new_cache()
    >>> lean.forward(prompt_ids, cache, logits="none")  # prefill, causal
    >>> logits = lean.forward(ids, cache, mask=mask, positions=positions)  # [n, V]
    """

    def __init__(self, model: nn.Module) -> None:
        if not lean_supported(model):
            raise ValueError(
                f"LeanDecoder supports Qwen2 and Llama causal LMs with SiLU MLPs and full attention, not "
                f"{type(model).__name__}; use the model's own forward"
            )
        self.model = model
        inner = model.model
        config = model.config
        self.embed = inner.embed_tokens
        self.layers = list(inner.layers)
        self.norm = inner.norm
        self.rotary = inner.rotary_emb
        self.lm_head = model.lm_head
        attn = self.layers[0].self_attn
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = [
            (layer.input_layernorm.variance_epsilon, layer.post_attention_layernorm.variance_epsilon)
            for layer in self.layers
        ]
        self.norm_eps = self.norm.variance_epsilon

    def new_cache(self, rows: int = 1) -> LeanCache:
        weight = self.embed.weight
        return LeanCache(
            len(self.layers), self.kv_heads, self.head_dim, weight.dtype, weight.device, rows=rows
        )

    def forward(
        self,
        input_ids: torch.Tensor | list[int],
        cache: LeanCache,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logits: Literal["all", "last", "none"] = "all",
    ) -> torch.Tensor | None:
        """Run ``input_ids`` ([n] or [1, n]) after the ``cache``'s entries (one row) and append their keys and
        values.

        mask: additive [1, 1, n, cached + n] (0 where attending; the form :func:`rasd.tree.attention_inputs`
            builds), or None for causal attention over the cache and these tokens.
        positions: [1, n] or [n] position ids (default: cached, cached + 1, ...).
        Returns the logits in the model's dtype: [n, V] for ``logits="all"``, the last position's [1, V] for
        ``"last"`` (only that row is projected onto the vocabulary), None for ``"none"`` (a prefill).
        """
        ids = torch.as_tensor(input_ids, device=self.embed.weight.device).reshape(1, -1)
        if positions is not None:
            positions = positions.reshape(1, -1)
        out = self.forward_batch(ids, cache, mask=mask, positions=positions, logits=logits)
        return None if out is None else out[0]

    @torch.inference_mode()
    def forward_batch(
        self,
        input_ids: torch.Tensor,
        cache: LeanCache,
        *,
        mask: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
        logits: Literal["all", "last", "none"] = "all",
    ) -> torch.Tensor | None:
        """:meth:`forward` for B rows at once: ``input_ids`` [B, n] after a ``cache`` of B rows (every row's
        n new columns at the same place; a row's own holes and padding are its mask's business).

        mask: additive [B, 1, n, cached + n], or None for causal attention (a prefill into an empty cache:
            right-padded rows need no mask).
        positions: [B, n] (default: cached, cached + 1, ... in every row).
        Returns [B, n, V] (``"all"``), [B, 1, V] (``"last"``) or None (``"none"``).
        """
        ids = torch.as_tensor(input_ids, device=self.embed.weight.device)
        rows, n = ids.shape
        if rows != cache.rows:
            raise ValueError(f"{rows} rows of input for a cache of {cache.rows} rows")
        past = cache.length
        if positions is None:
            positions = torch.arange(past, past + n, device=ids.device).expand(rows, n)
        cache.reserve(n)
        hidden = self.embed(ids)  # [B, n, d] (a module call: hooks on the embeddings see every forward)
        cos, sin = self.rotary(hidden, positions)  # [B, n, head_dim]
        cos, sin = cos[:, None], sin[:, None]
        half = self.head_dim // 2
        end = past + n
        is_causal = False
        if mask is None and n > 1:
            if past == 0:
                is_causal = True
            else:  # causal among the new tokens, all of the cache visible
                mask = torch.ones(n, end, dtype=torch.bool, device=ids.device).tril(past)
        elif mask is not None and mask.dtype != hidden.dtype:
            mask = mask.to(hidden.dtype)
        shape_q = (rows, n, self.heads, self.head_dim)
        shape_kv = (rows, n, self.kv_heads, self.head_dim)
        gqa = self.heads != self.kv_heads
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            eps_in, eps_post = self.eps[i]
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.input_layernorm.weight, eps_in)
            q = attn.q_proj.forward(x).view(shape_q).transpose(1, 2)
            k = attn.k_proj.forward(x).view(shape_kv).transpose(1, 2)
            v = attn.v_proj.forward(x).view(shape_kv).transpose(1, 2)
            q = q * cos + torch.cat((-q[..., half:], q[..., :half]), -1) * sin
            k = k * cos + torch.cat((-k[..., half:], k[..., :half]), -1) * sin
            keys, values = cache.keys[i], cache.values[i]
            keys[:, :, past:end] = k
            values[:, :, past:end] = v
            out = F.scaled_dot_product_attention(
                q,
                keys[:, :, :end],
                values[:, :, :end],
                attn_mask=mask,
                is_causal=is_causal,
                scale=self.scaling,
                enable_gqa=gqa,
            )
            hidden = hidden + attn.o_proj.forward(out.transpose(1, 2).reshape(rows, n, -1))
            x = F.rms_norm(hidden, (hidden.shape[-1],), layer.post_attention_layernorm.weight, eps_post)
            hidden = hidden + mlp.down_proj.forward(F.silu(mlp.gate_proj.forward(x)) * mlp.up_proj.forward(x))
        cache.length = end
        if logits == "none":
            return None
        if logits == "last":
            hidden = hidden[:, -1:]
        hidden = F.rms_norm(hidden, (hidden.shape[-1],), self.norm.weight, self.norm_eps)
        return self.lm_head.forward(hidden)
