"""Verification of a token tree by the target model in one forward pass, and lossless acceptance.

The pieces, each small and pure where possible:

- :class:`SamplingConfig` resolves temperature / top-k / top-p / min-p exactly as HF ``generate`` does
  (user value, else the model's generation config, else transformers' global defaults) and applies HF's
  own logits warpers, so "the target's distribution" means the same thing here and in ``generate``.
- :func:`accept_greedy` / :func:`accept_sampling` turn the target's logits at every tree node into the
  accepted path plus one bonus token. Sampling uses the multi-candidate residual scheme, which keeps the
  output distribution exactly the target's for any tree: at each node the children are tried in index
  order; a deterministic child x (retrieval, or a draft token picked by top-k; q = 1) is accepted with
  probability r(x), a child drawn from the draft distribution q (without replacement among its sampled
  siblings) with probability min(1, r(x) / q'(x)), where q' is q with the earlier sampled siblings removed
  and renormalised; after a rejection r <- normalise(max(r - q', 0)) (for a deterministic x that just
  removes x). If every child is rejected, the bonus token is drawn from the residual r.
- :class:`TargetSession` owns the target's KV cache for one sequence: one forward over ``[root] + tree``
  with the 4D tree mask and per-node positions (unmodified HF model, ``sdpa`` or ``eager``), then
  compaction of the cache to the accepted path (gather the accepted rows, truncate the rest).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rasd.fastpath import ForwardPlan
from rasd.lean import LeanDecoder, lean_applies
from rasd.tree import TokenTree, tree_attention_inputs

SUPPORTED_ATTENTION = ("sdpa", "eager")
# Generation-config fields that change the target's distribution but that speculative acceptance does
# not implement; a model whose generation config sets them is refused rather than silently diverging.
_UNSUPPORTED_PROCESSING = {
    "repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_repetition_penalty": 1.0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "top_h": None,
    "bad_words_ids": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "sequence_bias": None,
    "min_new_tokens": None,
    "min_length": 0,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
}


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next-token distribution is formed. ``do_sample=False`` means greedy.

    Build it with :meth:`resolve` to inherit the model's generation config and HF's defaults (e.g. HF
    samples with top_k=50 unless told otherwise).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(
                f"temperature must be > 0 (use do_sample=False for greedy), got {self.temperature}"
            )
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.min_p is not None and not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")

    @classmethod
    def resolve(
        cls,
        model: torch.nn.Module | None = None,
        *,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
    ) -> SamplingConfig:
        """User value > ``model.generation_config`` > transformers' global defaults, as in ``generate``."""
        from transformers import GenerationConfig

        base = getattr(model, "generation_config", None) or GenerationConfig()
        if model is not None:
            for name, neutral in _UNSUPPORTED_PROCESSING.items():
                value = getattr(base, name, neutral)
                if value not in (neutral, None) and value != neutral:
                    raise ValueError(
                        f"the model's generation config sets {name}={value!r}, which rasd's speculative "
                        "decoding does not implement; reset it "
                        f"(model.generation_config.{name} = {neutral!r}) to compare against plain generate()"
                    )
        defaults = GenerationConfig._get_default_generation_params()

        def pick(name, value):
            if value is not None:
                return value
            current = getattr(base, name, None)
            return current if current is not None else defaults.get(name)

        return cls(
            do_sample=bool(pick("do_sample", do_sample)),
            temperature=float(pick("temperature", temperature)),
            top_k=pick("top_k", top_k),
            top_p=pick("top_p", top_p),
            min_p=pick("min_p", min_p),
        )

    def warpers(self):
        """HF's own logits warpers, in the order ``generate`` applies them (empty when greedy)."""
        from transformers import (
            LogitsProcessorList,
            MinPLogitsWarper,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        out = LogitsProcessorList()
        if not self.do_sample:
            return out
        if self.temperature != 1.0:
            out.append(TemperatureLogitsWarper(self.temperature))
        if self.top_k:
            out.append(TopKLogitsWarper(top_k=self.top_k))
        if self.top_p is not None and self.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=self.top_p))
        if self.min_p is not None:
            out.append(MinPLogitsWarper(min_p=self.min_p))
        return out

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """logits [M, V] -> the sampling distribution [M, V] (float32), as HF ``generate`` samples it."""
        scores = logits.float()
        warpers = self.warpers()
        if warpers:
            dummy_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long, device=scores.device)
            scores = warpers(dummy_ids, scores)
        return torch.softmax(scores, dim=-1)


@dataclass(frozen=True)
class Acceptance:
    """Outcome of one verification step.

    path:   accepted node indices of the tree, root first (excluded) to deepest.
    tokens: the accepted tokens followed by the bonus token (len(path) + 1 tokens).
    """

    path: list[int]
    tokens: list[int]

    @property
    def bonus(self) -> int:
        return self.tokens[-1]


def accept_greedy(tree: TokenTree, logits: torch.Tensor) -> Acceptance:
    """Longest root path whose tokens equal the target's argmax at each parent.

    logits: [N + 1, V], row 0 for the root, row i + 1 for node i.
    """
    argmax = logits.argmax(dim=-1).tolist()
    children = tree.children()
    tokens = tree.tokens.tolist()
    path: list[int] = []
    node = -1
    while True:
        want = argmax[node + 1]
        nxt = next((c for c in children[node + 1] if tokens[c] == want), None)
        if nxt is None:
            return Acceptance(path, [tokens[i] for i in path] + [want])
        path.append(nxt)
        node = nxt


def accept_sampling(
    tree: TokenTree,
    logits: torch.Tensor,
    config: SamplingConfig,
    generator: torch.Generator | None = None,
) -> Acceptance:
    """Lossless acceptance for any mixed tree (see the module docstring for the rule).

    logits: [N + 1, V]; only the rows along the walk are turned into probabilities. ``generator`` makes
    runs reproducible; it must live on the logits' device.
    """
    children = tree.children()
    tokens = tree.tokens.tolist()
    q_rows = tree.q_rows.tolist()
    path: list[int] = []
    node = -1
    device = logits.device

    def uniform() -> float:
        return float(torch.rand((), generator=generator, device=device))

    while True:
        residual = config.probs(logits[node + 1 : node + 2])[0]  # [V]
        drawn_by_row: dict[int, list[int]] = {}  # q row -> tokens of earlier sampled siblings
        accepted = None
        for child in children[node + 1]:
            x = tokens[child]
            if x >= residual.shape[0]:
                continue  # a token the target cannot emit is rejected with certainty; r is unchanged
            row = q_rows[child]
            if row < 0:  # deterministic candidate: q = point mass on x
                q = None
                ratio = float(residual[x])
            else:
                q = _proposal(tree.q_dists[row], drawn_by_row.setdefault(row, []), residual.shape[0])
                qx = float(q[x])
                ratio = min(1.0, float(residual[x]) / qx) if qx > 0 else 0.0
                drawn_by_row[row].append(x)
            if uniform() < ratio:
                accepted = child
                break
            after = _residual_after_rejection(residual, x, q)
            if after is None:
                # Only reachable through rounding: an exhausted residual means q' equalled r, where the
                # child would have been accepted with probability 1. The bonus comes from r itself.
                break
            residual = after
        if accepted is None:
            bonus = int(torch.multinomial(residual, 1, generator=generator))
            return Acceptance(path, [tokens[i] for i in path] + [bonus])
        path.append(accepted)
        node = accepted


def accept(
    tree: TokenTree, logits: torch.Tensor, config: SamplingConfig, generator: torch.Generator | None = None
) -> Acceptance:
    """:func:`accept_sampling` when ``config`` samples, else :func:`accept_greedy`."""
    if config.do_sample:
        return accept_sampling(tree, logits, config, generator)
    return accept_greedy(tree, logits)


def _residual_after_rejection(residual: torch.Tensor, x: int, q: torch.Tensor | None) -> torch.Tensor | None:
    """normalise(max(r - q, 0)); for a deterministic candidate q is the point mass on x, which just removes
    x. None if nothing is left (only possible through rounding)."""
    if q is None:
        residual = residual.clone()
        residual[x] = 0.0
    else:
        residual = torch.clamp(residual - q, min=0.0)
    total = float(residual.sum())
    return residual / total if total > 0 else None


def _proposal(q_row: torch.Tensor, excluded: list[int], vocab: int) -> torch.Tensor:
    """The distribution a sampled sibling was drawn from: q without earlier draws, renormalised, on V."""
    q = q_row.float()
    q = q[:vocab] if q.shape[0] >= vocab else torch.nn.functional.pad(q, (0, vocab - q.shape[0]))
    if excluded:
        q = q.clone()
        q[excluded] = 0.0
    return q / q.sum().clamp_min(1e-30)


def check_model(model: torch.nn.Module) -> None:
    """Refuse models the verifier cannot drive exactly, with a message saying what to do."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_output_embeddings"):
        raise TypeError("expected a Hugging Face causal LM (a PreTrainedModel with a language-model head)")
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError("encoder-decoder models are not supported; use a decoder-only causal LM")
    impl = getattr(config, "_attn_implementation", None)
    if impl not in SUPPORTED_ATTENTION:
        raise ValueError(
            f"attention implementation {impl!r} is not supported for tree verification (it must accept a "
            f"custom 4D mask); load the model with attn_implementation='sdpa' or 'eager'"
        )
    if _uses_window(config):
        raise ValueError(
            "models with sliding-window attention layers are not supported: their KV cache drops old tokens "
            "while a tree is verified, and a custom tree mask would override the window"
        )


def _uses_window(config) -> bool:
    layer_types = getattr(config, "layer_types", None) or ()
    if any("sliding" in str(t) for t in layer_types):
        return True
    if getattr(config, "sliding_window", None) is None:
        return False
    return bool(getattr(config, "use_sliding_window", True))


@functools.cache
def _cache_keyword(module_type: type) -> str:
    try:
        params = inspect.signature(module_type.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def with_cache(module: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` for ``module(...)``: transformers >= 5.2x names the KV-cache argument ``cache``
    (``past_key_values`` is deprecated there and goes away in 5.40), older releases ``past_key_values``."""
    return {_cache_keyword(type(module)): cache}


@torch.inference_mode()
def fill_cache(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache: Any,
    *,
    mask: torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
) -> None:
    """Prefill: run ``input_ids`` [B, L] through ``model`` into ``cache`` without computing logits.

    The logits of a prompt are never used (the last prompt token is fed again with the first tree), and
    the vocabulary projection is a large share of a small model's prefill (Qwen2.5 0.5B: ~28 %, 1.5B:
    ~15 % of the FLOPs), so only the decoder stack runs. ``mask`` (additive [B, 1, L, cached + L]) and
    ``positions`` ([B, L]) replace the causal default and cached, cached + 1, ..., e.g. for several
    prompts packed into one row.
    """
    extra = {}
    if mask is not None:
        extra["attention_mask"] = mask
    if positions is not None:
        extra["position_ids"] = positions
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or decoder is model:
        model(input_ids, use_cache=True, **extra, **with_cache(model, cache))
    else:
        decoder(input_ids=input_ids, use_cache=True, **extra, **with_cache(decoder, cache))


def _prefill_last_logits(model: torch.nn.Module, input_ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Prefill ``input_ids`` [1, L] into ``cache`` and return the last position's logits [1, V] (float32),
    projecting only that position onto the vocabulary (``logits_to_keep=1``, as HF ``generate`` does)."""
    with torch.inference_mode():
        try:
            out = model(input_ids, use_cache=True, logits_to_keep=1, **with_cache(model, cache))
        except TypeError as err:  # a model whose forward has no logits_to_keep
            if "logits_to_keep" not in str(err):
                raise
            out = model(input_ids, use_cache=True, **with_cache(model, cache))
    return out.logits[0, -1:].float()


class TargetSession:
    """The target model's KV cache for one sequence, advanced one verification step at a time.

    Invariant: the cache holds ``past_length`` tokens; ``root`` is the last committed token and is *not*
    in the cache yet (it is fed with the next tree, so its logits score the tree's first level).

    score_root: the prefill runs the whole prompt, root included, and keeps the root's logits
        (:attr:`root_logits`, [1, V] float32), as if :meth:`verify` had been called with an empty tree: the
        first token then needs only ``commit(accept(TokenTree.empty(), root_logits))``, no forward, as in
        HF ``generate``, whose prefill gives the first token. Without it the prefill stops before the root
        and the first step feeds the root again with its tree (one more forward before the first token).
    lean: run the forwards on :class:`rasd.lean.LeanDecoder` where it supports the model (fp32 Qwen2 / Llama
        on a CPU): the model's own arithmetic without Hugging Face's per-op overhead (1.5B target, 2-core
        EPYC: see rasd/lean.py). False: always the model's forward.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        input_ids: torch.Tensor,
        *,
        plan: ForwardPlan | None = None,
        score_root: bool = False,
        lean: bool = True,
    ) -> None:
        check_model(model)
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("TargetSession holds one sequence; pass input_ids of shape [1, L] or [L]")
            ids = ids[0]
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError("input_ids must be a non-empty 1-D sequence of token ids (the prompt is empty)")
        vocab = model.get_output_embeddings().weight.shape[0]
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise ValueError(f"input_ids contain ids outside [0, {vocab}): wrong tokenizer for this model?")
        from transformers import DynamicCache

        self.model = model
        self.vocab_size = vocab
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.plan = plan or ForwardPlan()
        self.lean = LeanDecoder(model) if lean and lean_applies(model) else None
        self.cache = DynamicCache(config=model.config) if self.lean is None else self.lean.new_cache()
        self.past_length = 0
        self.root = int(ids[-1])
        self.root_logits: torch.Tensor | None = None
        if score_root:
            if self.lean is not None:
                self.root_logits = self.lean.forward(ids.to(self.device), self.cache, logits="last").float()
            else:
                self.root_logits = _prefill_last_logits(model, ids[None].to(self.device), self.cache)
            self.past_length = ids.numel() - 1  # the root's entry is cached, as after verify(empty tree)
            self._check_cache()
        elif ids.numel() > 1:
            if self.lean is not None:
                self.lean.forward(ids[:-1].to(self.device), self.cache, logits="none")
            else:
                fill_cache(model, ids[None, :-1].to(self.device), self.cache)
            self.past_length = ids.numel() - 1
            self._check_cache()

    def _check_cache(self) -> None:
        from transformers.cache_utils import DynamicLayer

        if self.lean is not None:
            return
        for layer in self.cache.layers:
            if type(layer) is not DynamicLayer:
                raise ValueError(
                    f"unsupported KV cache layer {type(layer).__name__}: tree verification compacts "
                    "DynamicLayer caches only (full attention, no sliding window)"
                )

    def verify(self, tree: TokenTree) -> torch.Tensor:
        """One forward of ``[root] + tree``; returns the target logits [N + 1, V] (float32).

        Afterwards the cache holds past + N + 1 entries until :meth:`commit` compacts it.
        """
        n = len(tree)
        if n and int(tree.tokens.max()) >= self.vocab_size:
            raise ValueError(f"tree contains token ids >= the target's vocabulary size {self.vocab_size}")
        mask, positions = tree_attention_inputs(tree, self.past_length, dtype=self.dtype, device=self.device)
        ids = torch.from_numpy(np.concatenate([[self.root], tree.tokens]).astype(np.int64))[None].to(
            self.device
        )
        with torch.inference_mode(), self.plan.forward(n + 1):
            if self.lean is not None:
                return self.lean.forward(ids[0], self.cache, mask=mask, positions=positions).float()
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions,
                use_cache=True,
                **with_cache(self.model, self.cache),
            )
        return out.logits[0].float()

    def commit(self, acceptance: Acceptance) -> None:
        """Keep the root and the accepted path in the cache, drop the rejected nodes, advance the root."""
        path = acceptance.path
        keep_from = self.past_length + 1  # the root's entry stays
        if path and path != list(range(len(path))):
            src = torch.tensor([keep_from + i for i in path], device=self.device)
            with torch.inference_mode():  # the cache tensors are inference tensors
                self._gather(src, keep_from, len(path))
        total = self.cache.get_seq_length()
        drop = total - (keep_from + len(path))
        if drop > 0:
            self.cache.crop(-drop)
        self.past_length = keep_from + len(path)
        self.root = acceptance.bonus

    def discard(self) -> None:
        """Undo the last :meth:`verify`: drop everything after the committed past from the cache."""
        extra = self.cache.get_seq_length() - self.past_length
        if extra > 0:
            self.cache.crop(-extra)

    def _gather(self, src: torch.Tensor, start: int, count: int) -> None:
        # Gather the accepted rows (index_select copies them first), write them right after the root.
        # (A LeanCache's layers are views of its buffers: the writes land in the cache.)
        for layer in self.cache.layers:
            layer.keys[:, :, start : start + count] = layer.keys.index_select(2, src)
            layer.values[:, :, start : start + count] = layer.values.index_select(2, src)
