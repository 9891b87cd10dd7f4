"""A small draft model (same tokenizer as the target) that grows a dynamic tree, EAGLE-2 style.

One proposal:

1. **catch up**: one forward of the draft over the tokens committed since its last forward (the last one is
   the root); its logits at the root give the first level of children.
2. **candidates**: every node whose parent has been fed through the draft gets its draft probability
   p(node | path); every fed node contributes its ``top_k`` most likely children (or, when sampling, ``top_k``
   draws without replacement from the draft distribution). Seed nodes (retrieval trees, fused by
   longest-prefix matching) are candidates like any other and are scored the same way.
3. **expand**: feed the ``beam`` unfed candidates with the highest estimated path probability through the
   draft in one tree-attention forward (they see the committed text and their fed ancestors), which yields
   their children; repeat while the plan says one more forward raises the step's expected tokens per second
   (or up to ``max_depth`` forwards without a planner).
4. **hand over**: all candidates, siblings in the verifier's try order; the decoding loop keeps the
   best-first prefix that pays.

Candidates grow in a :class:`rasd.tree.TreeBuilder`; every forward's mask and positions come from
:func:`rasd.tree.attention_inputs`. The draft's KV cache keeps the committed text; tree entries are cropped
away in ``advance``. Draft weights may run in bf16 or int8 (``weights=``): the draft only proposes, so its
precision changes speed and acceptance, never the output.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from rasd.costmodel import forward_plan
from rasd.drafting.base import DraftContext, DraftPrefill, Proposal, StepBudget, StepResult
from rasd.fastpath import (
    FastPath,
    FastPathConfig,
    ForwardPlan,
    emulated_on_this_cpu,
    int8_linear_available,
    torch_threads,
)
from rasd.lean import LeanDecoder, lean_applies
from rasd.planner import AcceptanceModel, PlanView
from rasd.tree import Source, TokenTree, TreeBuilder, attention_inputs, best_first_order
from rasd.verify import SamplingConfig, check_model, fill_cache, with_cache


@dataclass(frozen=True)
class DraftTreeConfig:
    """The draft tree's shape and the draft model's constants; each default says where it comes from.

    ``weights="bf16"`` offers the native kernel on bf16 weights and torch's bf16 matmul besides plain fp32
    torch, ``weights="int8"`` the native kernel on per-row int8 weights (a quarter of fp32's memory traffic)
    and the same two, and each forward size runs on whichever measured fastest
    (:func:`rasd.costmodel.forward_plan`); ignored off CPU.
    ``context=N`` lets the draft see only the last N prompt tokens: prefilling a long prompt through the
    draft costs about draft/target of the target's prefill, which short answers never earn back; retrieval
    still copies from the whole prompt. Changes speed, never the output.
    """

    # Children taken from each fed node's distribution: the Qwen 0.5B's 6th choice is still accepted ~2 %
    # of the time on code; more only lengthens the candidate list.
    top_k: int = 6
    # Candidates fed per expansion forward: on the CPU fast path a forward over 4 tokens costs about one
    # over 1 token, over 8 noticeably more.
    beam: int = 4
    max_depth: int = 8  # expansion forwards per step at most (the plan usually stops earlier)
    # Candidates the draft adds at most before the loop's selection. Seed (retrieval) nodes do not count:
    # fused retrieval trees brought 64 nodes per step (median; p90 128, max 180 on Spec-Bench prompts with
    # the Qwen pair), and counted, they stopped the draft after one expansion.
    max_nodes: int = 96
    # Retrieval (seed) nodes fed with the catch-up forward, so their subtrees are scored and extendable
    # without extra forwards; the best ones by the retrieval estimate.
    seed_feed: int = 8
    # A seed is fed only when its estimated path probability is at least this: below 0.25 fed seeds were
    # almost never extended on the dev split.
    seed_min_path: float = 0.25
    # Weights of the draft's CPU fast paths: "int8", "bf16" or "fp32". int8 (a quarter of fp32's stream):
    # 0.5B draft at context 300 on a 2-core EPYC, 1 / 4 / 8 tokens: 77 / 96 / 123 ms per forward in bf16,
    # 53 / 76 / 106 in int8; Spec-Bench (2 per column, 96 tokens) decode 2.12x -> 2.33x for the draft
    # alone, 1.96x -> 2.25x for rasd, accepted per forward unchanged (3.44 / 3.65), all 14/14 identical.
    weights: str = "int8"
    # With int8 weights (ignored otherwise), also offer torch's dynamically quantized int8 linear (int8
    # activations, FBGEMM or oneDNN; rasd.fastpath) to the forward plan, which runs each forward size, the
    # prompt's prefill included, on the path measured fastest; input columns with outlying magnitudes
    # stay fp32 there (INT8_OUTLIER_RATIO). 0.5B draft's prefill on a 2-core AVX2 EPYC, Spec-Bench prompts,
    # medians of 2 alternated: 39-84 tokens 0.47-0.74 -> 0.23-0.37 s (1.7-2.0x), 671-741 tokens 3.7-4.1 ->
    # 2.8-3.2 s (1.3-1.4x; attention, not the linears, is the rest). The plan keeps the weight-only int8
    # kernel for the small forwards of drafting there.
    int8_activations: bool = True
    context: int | None = None  # prompt tokens the draft sees (None: all)
    # Run the draft's forwards on rasd.lean.LeanDecoder where it supports the model (float32 CPU
    # Qwen2 / Llama): the same modules and arithmetic (logits bit-identical to Hugging Face's forward on
    # the 0.5B) without the per-op overhead. 0.5B draft at context 300, int8 weights, 2-core EPYC,
    # 1 / 4 / 8 tokens: 51 / 80 / 121 ms per forward through Hugging Face's forward, 39 / 56 / 111 lean.
    lean: bool = True
    # The draft's best child's acceptance before anything is learned: the Qwen pair's top-1 agreement is
    # 0.77-0.95 by task, the prior stays below it.
    child_prior: float = 0.7
    child_smoothing: float = 0.1  # EMA weight of each fed node's best-child estimate (~ the last 10 feeds)
    # Candidates below this estimated path probability are never fed: each would add ~1e-4 expected tokens
    # for a whole forward's worth of cost.
    min_frontier_prob: float = 1e-4
    # Tokens per forward the kernel path takes: a catch-up after skipped steps plus fed seeds stays under
    # 64; larger forwards run on torch.
    fast_max_rows: int = 64
    # Expansion forwards whose median prices the next one: ignores a one-off outlier such as a first call's
    # warm-up and still follows the context length.
    cost_window: int = 16
    # The plan prices expansion forwards by their measured median only once this many were measured, and
    # after explore_every drafted steps in a row without one, one more forward is measured: a slow early
    # measurement (a first call, another process on the cores) otherwise stops expansion for good, since
    # no further forward is ever timed. Seen once on Spec-Bench: two draft contenders in one process fed
    # no expansion for all 14 questions (1.2-1.9-node trees, ~1 accepted token per step, 1.83 accepted per
    # target forward against 3.2-3.7 for the same draft in other runs).
    min_cost_samples: int = 3
    explore_every: int = 16
    # Skip the draft model for a request whose prompt prefill through the draft is measured to cost more
    # than drafting saves over max_new_tokens (False: always run it).
    skip_unprofitable: bool = True
    # Beside retrievers (Fused), a draft prefill that costs more than this many tokens of the expected
    # saving waits: retrieval-only steps (at least this many tokens) measure what the draft would save
    # over retrieval in *this* request, and the prefill runs once the saving forgone so far reaches its
    # price (ski rental, see DraftModel.ready). On Spec-Bench summarization retrieval alone was as fast per
    # token as drafting, and RAG's 18-20-token answers never repaid a 740-805-token prefill. 0: decide at
    # begin (the prefill runs with the prompt's whenever the request's budget could repay it).
    probe_tokens: int = 4
    # A prefill that costs at most this many plain decode steps of the target runs with the prompt's,
    # whatever the learned saving says: a useless draft then costs at most that much, while a skip or a
    # probe rests on the seconds per drafted token learned on other requests, which a request that never
    # drafts cannot renew. On Spec-Bench (2 per column, 96 tokens, the Qwen pair on a 2-core EPYC) 7 of 14
    # requests with 39-178-token prompts (0.2-0.9 s of draft prefill, 1-4 plain steps) probed or skipped
    # on a rate learned on the warm-up or on another column's text and drafted nothing: translation 1.76x
    # decode against 2.21x for the same drafter always running. 8 steps of the 1.5B target are ~2 s, a
    # ~400-token prompt through the 0.5B; longer ones (RAG, summarization) still decide by the measures.
    run_within_steps: float = 8.0
    # Drafted positions learned (DraftAgreement) before a probe prices drafting by the target's confidence
    # in its own request rather than by the average over every request: about two requests' worth.
    agreement_positions: int = 64

    def __post_init__(self) -> None:
        if self.context is not None and self.context < 1:
            raise ValueError(f"context must be >= 1 or None, got {self.context}")
        if self.seed_feed < 0:
            raise ValueError(f"seed_feed must be >= 0, got {self.seed_feed}")
        if self.probe_tokens < 0:
            raise ValueError(f"probe_tokens must be >= 0, got {self.probe_tokens}")
        if not self.run_within_steps >= 0:
            raise ValueError(f"run_within_steps must be >= 0, got {self.run_within_steps}")
        if self.agreement_positions < 1:
            raise ValueError(f"agreement_positions must be >= 1, got {self.agreement_positions}")
        for name in (
            "top_k",
            "beam",
            "max_depth",
            "max_nodes",
            "fast_max_rows",
            "cost_window",
            "min_cost_samples",
            "explore_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed_min_path", "child_prior", "min_frontier_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0 < self.child_smoothing <= 1:
            raise ValueError(f"child_smoothing must be in (0, 1], got {self.child_smoothing}")
        if self.weights not in ("bf16", "int8", "fp32"):
            raise ValueError(f"weights must be 'bf16', 'int8' or 'fp32', got {self.weights!r}")


# Bins of the target's confidence at a committed position (its top-1 probability) for DraftAgreement.
_CONFIDENCE_EDGES = np.array([0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 0.995])


class DraftAgreement:
    """How often the draft's best guess is the target's next token, by the target's confidence there (its
    top-1 probability), learned on drafted steps over every request.

    What it is for: the seconds per token of drafted steps are learned as one average over every request,
    but the draft pays very unequally by text (Spec-Bench with the Qwen pair: 5 tokens per drafted step on
    math, 2 on conversation). A request whose draft has not run yet has no drafted steps of its own, but
    its retrieval-only steps show the target's confidence at every committed position, and the draft
    agrees with the target where the target is sure. :meth:`tokens_ratio` turns the two sets of
    confidences into how many more (or fewer) tokens a drafted step should commit in this request than in
    the drafted steps the average was learned on.

    Greedy requests only: a sampled step accepts by rejection sampling, not by top-1 agreement (sampled
    requests keep the average).

    prior_weight: pseudo-positions at the overall agreement in every bin (a bin seen a few times stays
        near it).
    window: committed positions of recent drafted steps kept (what the learned average describes).
    """

    def __init__(self, prior_weight: float = 4.0, window: int = 256) -> None:
        if prior_weight <= 0 or window < 1:
            raise ValueError(f"prior_weight must be > 0 and window >= 1, got {prior_weight}, {window}")
        self.prior_weight = prior_weight
        self.matched = np.zeros(len(_CONFIDENCE_EDGES) + 1)
        self.seen = np.zeros(len(_CONFIDENCE_EDGES) + 1)
        self.recent: collections.deque[float] = collections.deque(maxlen=window)

    @property
    def positions(self) -> int:
        """Positions learned from."""
        return int(self.seen.sum())

    def observe(self, confidence: np.ndarray, matched: np.ndarray) -> None:
        """One drafted step's positions: the target's confidence [n] and whether the draft's best guess
        was the committed token [n] (bool)."""
        bins = np.searchsorted(_CONFIDENCE_EDGES, confidence, side="right")
        np.add.at(self.seen, bins, 1.0)
        np.add.at(self.matched, bins, np.asarray(matched, dtype=np.float64))
        self.recent.extend(float(c) for c in confidence)

    def agreement(self, confidence: np.ndarray) -> float:
        """Predicted mean agreement over positions with these target confidences [n]."""
        overall = (self.matched.sum() + 1.0) / (self.seen.sum() + 2.0)
        per_bin = (self.matched + self.prior_weight * overall) / (self.seen + self.prior_weight)
        bins = np.searchsorted(_CONFIDENCE_EDGES, np.asarray(confidence), side="right")
        return float(per_bin[bins].mean())

    def tokens_ratio(self, confidence: np.ndarray, depth: int) -> float:
        """Tokens per drafted step expected at these confidences over those of the recent drafted steps,
        each from its mean agreement a as a chain of ``depth`` guesses (1 + a + ... + a^depth)."""

        def chain(a: float) -> float:
            return sum(a**d for d in range(depth + 1))

        return chain(self.agreement(confidence)) / chain(self.agreement(np.array(self.recent)))


def step_confidence(step: StepResult) -> np.ndarray | None:
    """The target's top-1 probability at each committed position of ``step`` [len(step.tokens)] (the root's
    row, then each accepted node's), or None without logits."""
    if step.logits is None:
        return None
    rows = step.logits[[0, *(1 + i for i in step.path)]].float()
    return torch.exp(rows.max(-1).values - torch.logsumexp(rows, -1)).cpu().numpy()


def draft_guess_matches(step: StepResult) -> tuple[np.ndarray, np.ndarray]:
    """(positions, matched): the committed positions of ``step`` after a node the draft expanded (the root
    or an accepted node with a draft child), and whether the draft's most likely child there is the token
    committed."""
    tree = step.tree
    positions, matched = [], []
    for j, node in enumerate((-1, *step.path)):
        kids = np.flatnonzero(tree.parents == node)
        if not len(kids) or not (tree.sources[kids] & int(Source.DRAFT)).any():
            continue
        probs = tree.draft_probs[kids]
        if np.isnan(probs).all():
            continue
        best = kids[int(np.nanargmax(probs))]
        positions.append(j)
        matched.append(int(tree.tokens[best]) == step.tokens[j])
    return np.array(positions, dtype=np.int64), np.array(matched, dtype=bool)


# Input columns the int8-activation path multiplies in fp32: beyond 6x the median column's magnitude (see
# rasd.fastpath). After a prefill on that path the 0.5B Qwen draft predicted 39-40 of the next 40 tokens as
# after an fp32 prefill on four Spec-Bench prompts (51-709 tokens).
INT8_OUTLIER_RATIO = 6.0


def draft_fast_paths(model: torch.nn.Module, config: DraftTreeConfig) -> list[FastPath]:
    """The CPU fast paths a draft model's forwards choose from (``config.weights``): the native kernel on the
    draft's weight copy; for int8 (``config.int8_activations``) also torch's dynamically quantized int8 linear
    on the same int8 weights, where this torch has it (the fastest prefill on an AVX2-only CPU); and for
    bf16 and int8 torch's bf16 matmul (oneDNN's, fastest on CPUs with AMX or AVX512-BF16 from a few tokens
    up and for the prefill), except where this CPU only emulates bf16 matmuls (AVX2-only): there that path
    never wins, and its bf16 copy of the weights (1 GB for the 0.5B Qwen) and its calibration would be paid
    for nothing."""
    paths = [FastPath.for_model(model, FastPathConfig(weights=config.weights, max_rows=config.fast_max_rows))]
    if config.weights == "int8" and config.int8_activations and int8_linear_available():
        int8 = FastPathConfig(weights="int8", backend="torch", outlier_ratio=INT8_OUTLIER_RATIO)
        paths.append(FastPath.for_model(model, int8))
    if config.weights != "fp32" and not emulated_on_this_cpu(torch.bfloat16):
        paths.append(FastPath.for_model(model, FastPathConfig(weights="bf16", backend="torch")))
    return paths


class DraftModel:
    """Drafter backed by a small causal LM sharing the target's tokenizer.

    With a plan in the budget (the loop's planner view), expansion stops when one more forward no longer
    raises the expected rate; without one, ``max_depth`` forwards always run. When the request samples, the
    children are drawn without replacement from the draft distribution (processed like the target's) and
    carry it as ``q`` for lossless acceptance.

    fast_path: "auto" (fp32 CPU models) offers the CPU fast paths; each forward size then runs on the
        path measured fastest (:class:`rasd.fastpath.ForwardPlan`, small forwards with torch at one thread).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        config: DraftTreeConfig | None = None,
        fast_path: bool | str = "auto",
    ) -> None:
        check_model(model)
        self.model = model
        self.config = config or DraftTreeConfig()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        if param.device.type == "cpu" and emulated_on_this_cpu(param.dtype):
            warnings.warn(
                f"the draft model is {param.dtype} on a CPU without native {param.dtype} matrix kernels "
                "(oneDNN has none here), so its forwards are emulated and slow (on a 2-core AVX2 EPYC, "
                "rasd with SmolLM2-135M drafting for itself took 2.5x as long as with the same weights in "
                "float32), and rasd's CPU fast paths take float32 models only. Load the draft in float32: "
                "rasd still runs its weights in int8 or bf16 copies where that measures faster "
                "(DraftTreeConfig.weights).",
                RuntimeWarning,
                stacklevel=2,
            )
        if fast_path == "auto":
            fast_path = param.device.type == "cpu" and param.dtype == torch.float32
        self.plan = ForwardPlan()
        if fast_path:
            # Each forward size (and the prefill) runs on whichever path measured fastest on this machine.
            self.plan = forward_plan(model, draft_fast_paths(model, self.config), threads=1)
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self.lean = LeanDecoder(model) if self.config.lean and lean_applies(model) else None
        self.sampling = SamplingConfig()
        self.generator: torch.Generator | None = None
        self.cache = None
        self.past = 0
        self.pending: list[int] = []
        self.fed_pending = False
        self.child_prob = self.config.child_prior  # running mean of the best child's estimated acceptance
        self.forwards = 0
        self.seconds = 0.0
        self._expansion_seconds: collections.deque[float] = collections.deque(maxlen=self.config.cost_window)
        self._prefill_rate: collections.deque[float] = collections.deque(maxlen=self.config.cost_window)
        self._steps_unexpanded = 0  # drafted steps in a row whose plan fed no expansion forward
        self.active = True  # False: the draft model does not run (now, or for this request: see _decide)
        self.probing = False  # the prefill waits on retrieval-only steps' measured saving (see ready)
        self._context: list[int] = []  # the request's committed tokens while the prefill waits
        self._request: DraftContext | None = None
        self._generated = 0  # new tokens committed in this request
        self._probe_start: tuple[float, int] | None = None  # (clock, tokens) at the first retrieval-only step
        self._prefill_report: DraftPrefill | None = None
        self._decision_report: str | None = None  # this request's _decide, until a proposal carries it
        self.agreement = DraftAgreement()  # learned on drafted steps (what a probe predicts from)
        self._probe_confidence: list[float] = []  # the target's, at this request's retrieval-only positions
        self._can_probe = False  # this request's begin(probe=...)
        self.clock: Callable[[], float] = time.perf_counter  # what the probe measures retrieval steps with
        self._threads = torch.get_num_threads()

    # -- protocol ----------------------------------------------------------------------------------
    def begin(self, context: DraftContext, *, probe: bool = False) -> None:
        """probe: retrievers propose beside this draft (Fused), so retrieval-only steps can measure what
        the draft saves in this request before its prefill is paid (``DraftTreeConfig.probe_tokens``)."""
        from transformers import DynamicCache

        self.sampling, self.generator = context.sampling, context.generator
        self._request, self._generated, self._probe_start = context, 0, None
        self._probe_confidence = []
        self._can_probe = probe  # retrievers beside: what the agreement is learned for (see _learn_agreement)
        self._threads = torch.get_num_threads()  # the caller's, before the decode loop narrows them
        self._prefill_report = None
        self.cache = DynamicCache(config=self.model.config) if self.lean is None else self.lean.new_cache()
        self.past = 0
        self.pending = [context.prompt[-1]]
        self.fed_pending = False
        decision = self._decide(context, probe)
        self.active, self.probing = decision == "run", decision == "probe"
        self._decision_report = decision
        self._context = list(context.prompt) if self.probing else []
        if self.active:
            self._prefill(list(context.prompt))

    def _prefill(self, tokens: list[int]) -> None:
        """Fill the draft's cache with the committed tokens but the last (the next tree's root)."""
        if self.config.context is not None:
            tokens = tokens[-self.config.context :]
        start = time.perf_counter()
        if len(tokens) > 1:
            # At the request's own thread count: a deferred prefill runs inside the decode loop, which
            # narrows torch's threads for small forwards (810 tokens of the 0.5B: 1.98 s at 2, 3.55 s at 1).
            with torch_threads(self._threads), self.plan.forward(len(tokens) - 1, prefill=True):
                self._fill(tokens[:-1])
            self._prefill_rate.append((time.perf_counter() - start) / (len(tokens) - 1))
        self.past = len(tokens) - 1
        self.pending = [tokens[-1]]
        self.fed_pending = False
        self._prefill_report = DraftPrefill(self._generated, time.perf_counter() - start)

    def _fill(self, tokens: list[int]) -> None:
        """Run committed tokens into the (empty) cache, computing no logits."""
        if self.lean is not None:
            self.lean.forward(tokens, self.cache, logits="none")
        else:
            fill_cache(self.model, torch.tensor([tokens], device=self.device), self.cache)

    def _prefill_seconds(self, tokens: int) -> float:
        if self.config.context is not None:
            tokens = min(tokens, self.config.context)
        return statistics.median(self._prefill_rate) * max(tokens - 1, 0)

    def _decide(self, context: DraftContext, probe: bool) -> str:
        """ "run" (prefill now), "skip" (not this request) or "probe" (prefill later, if it pays): the
        draft's prefill of the prompt (measured seconds per token on earlier requests) against what
        drafting saves over the answer (a plain decode step per token minus the learned seconds per token
        of drafted steps, over max_new_tokens). Until both are measured, and whenever the prefill costs at
        most ``run_within_steps`` plain decode steps, the draft runs."""
        plan, budget = context.plan, context.max_new_tokens
        drafted = plan.seconds_per_drafted_token if plan is not None else None
        if not self.config.skip_unprofitable or drafted is None or budget is None or len(context.prompt) <= 1:
            return "run"
        if not self._prefill_rate:
            return "run"
        price = self._prefill_seconds(len(context.prompt))
        if price <= self.config.run_within_steps * plan.verify_seconds(0):
            return "run"
        saving = plan.verify_seconds(0) - drafted  # per token, at best (retrieval saves some too)
        if saving <= 0:
            # Drafted steps measured no faster than plain ones. A skip would never be re-measured (a
            # skipped request drafts nothing), so run it and let the loop's planner decide each step.
            return "run"
        if price >= budget * saving:
            return "skip"
        probe = probe and self.config.probe_tokens > 0
        return "probe" if probe and price > self.config.probe_tokens * saving else "run"

    def ready(self) -> bool:
        """Whether the draft model runs this step. While probing, buys the prefill as in ski rental: once
        the saving forgone so far (tokens committed x the saving per token that the retrieval-only steps
        measure against the learned cost of drafted steps, after at least ``probe_tokens`` tokens) reaches
        the prefill's price, and the tokens the request may still produce can repay it. An answer that
        ends sooner never pays the prefill; a long one pays at most its price in forgone saving (on
        Spec-Bench RAG: 18-20-token answers after 740-805-token prompts ran 0.78-0.91x with the prefill)."""
        if self.probing and self._probe_pays(self.clock()):
            self.probing, self.active = False, True
            self._prefill(self._context)
            self._context = []
        return self.active

    def _probe_pays(self, now: float) -> bool:
        if self._probe_start is None:
            self._probe_start = (now, self._generated)
        tokens = self._generated - self._probe_start[1]
        plan = self._request.plan if self._request is not None else None
        if tokens < self.config.probe_tokens or plan is None:  # (probing needs probe_tokens >= 1)
            return False
        drafted = plan.seconds_per_drafted_token
        if drafted is None:
            return False
        drafted *= self._drafted_cost_factor()  # this request's text, not the average's
        saving = (now - self._probe_start[0]) / tokens - drafted  # per token: retrieval-only minus drafted
        price = self._prefill_seconds(len(self._context))
        remaining = self._request.max_new_tokens - self._generated
        return min(self._generated, remaining) * saving >= price

    def _drafted_cost_factor(self) -> float:
        """Seconds per drafted token in this request over the learned average: the inverse of
        :meth:`DraftAgreement.tokens_ratio` on the probe's positions (1.0 until enough is learned)."""
        a = self.agreement
        if self.sampling.do_sample or not a.recent or len(self._probe_confidence) < 2:
            return 1.0  # (sampled steps accept by rejection sampling, not by top-1 agreement)
        if a.positions < self.config.agreement_positions:
            return 1.0
        return 1.0 / a.tokens_ratio(np.array(self._probe_confidence), self.config.max_depth)

    def _learn_agreement(self, step: StepResult) -> None:
        """The target's confidence at this step's positions: for the probe while it waits, and with the
        draft's guesses on a drafted step (what the probe predicts from). Only for a draft with retrievers
        beside it (a draft alone never probes, so the confidences would cost ~1 ms a step for nothing)."""
        enabled = self.config.skip_unprofitable and self.config.probe_tokens > 0
        if not (enabled and self._can_probe) or self.sampling.do_sample:
            return
        if self.probing:
            confidence = step_confidence(step)
            if confidence is not None:
                self._probe_confidence.extend(confidence[np.isfinite(confidence)].tolist())
        elif self.active:
            positions, matched = draft_guess_matches(step)
            confidence = step_confidence(step) if len(positions) else None
            if confidence is not None:
                keep = np.isfinite(confidence[positions])
                self.agreement.observe(confidence[positions][keep], matched[keep])

    def take_reports(self) -> dict[str, Any]:
        """What the next proposal reports, once: ``draft_prefill`` (a prefill not yet reported) and
        ``draft_decision`` (this request's choice, on its first proposal), as :class:`Proposal` fields."""
        reports = {"draft_prefill": self._prefill_report, "draft_decision": self._decision_report}
        self._prefill_report = self._decision_report = None
        return reports

    def propose(self, budget: StepBudget) -> Proposal:
        proposal = self.expand(budget) if self.ready() else Proposal.empty()
        return dataclasses.replace(proposal, **self.take_reports())

    def advance(self, step: StepResult) -> None:
        self._generated += len(step.tokens)
        self._learn_agreement(step)
        if not self.active:
            if self.probing:
                self._context.extend(step.tokens)
            return
        if self.fed_pending:
            # Drop the tree entries; the committed tokens fed so far stay in the cache.
            self.past += len(self.pending)
            extra = self.cache.get_seq_length() - self.past
            if extra > 0:
                self.cache.crop(-extra)
            self.pending = list(step.tokens)
        else:
            self.pending.extend(step.tokens)
        self.fed_pending = False

    # -- expansion ---------------------------------------------------------------------------------
    def expand(
        self,
        budget: StepBudget,
        seed: TokenTree | Callable[[], TokenTree] | None = None,
        *,
        sunk_seconds: float = 0.0,
        keep_drafting: Callable[[TokenTree], bool] | None = None,
    ) -> Proposal:
        """Candidates for one step (see the module docstring); the seed's nodes join them.

        seed: deterministic retrieval nodes, or a callable returning them once the catch-up forward is
            done (retrieval overlapped with that forward).
        sunk_seconds: already spent this step before this call (retrieval), for the plan's rates.
        keep_drafting: called after the catch-up with the seed as the draft scored it (every seed node whose
            parent the catch-up fed carries the draft's probability of it); False = hand that tree over
            undrafted, with no expansion forward.
        """
        start = time.perf_counter()
        waited = 0.0
        plan = budget.plan
        nodes = TreeBuilder()
        slots: dict[int, int] = {}  # builder node -> draft KV slot, once fed
        q_dists: list[torch.Tensor] = []
        seed_nodes: list[int] = []
        if isinstance(seed, TokenTree):
            seed_nodes = nodes.add_tree(seed)
        # The catch-up forward also feeds the most promising seed nodes (ancestor-closed), so the draft
        # scores the retrieval subtrees below them in the same pass.
        fed_seeds = self._seeds_to_feed(nodes, seed_nodes, plan)
        root_logits, seed_logits = self._catch_up(nodes, slots, fed_seeds)
        if callable(seed):
            before = time.perf_counter()
            seed = seed()
            waited = time.perf_counter() - before
            nodes.add_tree(seed)
        fed = [(-1, root_logits), *zip(fed_seeds, seed_logits, strict=True)]
        probs = [torch.softmax(row[: self.vocab_size], -1) for _, row in fed]
        if keep_drafting is not None:
            for (node, _), p in zip(fed, probs, strict=True):
                self._score_children(nodes, node, p)
            scored = nodes.build()
            if not keep_drafting(scored):
                return Proposal(scored, drafted=False, draft_seconds=time.perf_counter() - start - waited)
        seeded = len(nodes)  # the seed's nodes: not counted against max_nodes
        expanded = False
        for (node, row), p in zip(fed, probs, strict=True):
            self._add_children(nodes, node, row, q_dists, plan, probs=p)
        for _ in range(self.config.max_depth):
            frontier = self._frontier(nodes, slots, plan)
            if not frontier:
                break
            if plan is not None:
                elapsed = sunk_seconds + time.perf_counter() - start
                current = nodes.build(torch.stack(q_dists) if q_dists else None)
                cost = self._expansion_cost()
                m = plan.plan_expansion(current, frontier, elapsed, self.child_prob, cost, budget.max_nodes)
                frontier = frontier[:m]
                if not frontier:
                    break
            before = time.perf_counter()
            logits = self._feed(nodes, slots, frontier)
            self._expansion_seconds.append(time.perf_counter() - before)
            expanded = True
            for node, row in zip(frontier, logits, strict=True):
                self._add_children(nodes, node, row, q_dists, plan)
            if len(nodes) - seeded >= self.config.max_nodes:
                break
            if self.sampling.do_sample and budget.max_nodes is not None and len(nodes) >= budget.max_nodes:
                break  # sampled nodes are never trimmed (tree.keep_first): stop at the step's budget
        self._steps_unexpanded = 0 if expanded else self._steps_unexpanded + 1
        tree = nodes.build(torch.stack(q_dists) if q_dists else None, order=nodes.try_order())
        return Proposal(
            tree,
            drafted=True,
            draft_seconds=time.perf_counter() - start - waited,
        )

    def _expansion_cost(self) -> float | None:
        """Seconds the plan prices the next expansion forward at: the median of the recent ones, or None
        (explore: the plan feeds every candidate and the forward is timed) while fewer than
        ``min_cost_samples`` were measured or after ``explore_every`` drafted steps without one."""
        measured = self._expansion_seconds
        explore = self._steps_unexpanded >= self.config.explore_every
        if explore or len(measured) < self.config.min_cost_samples:
            return None
        return statistics.median(measured)

    def _path_probs(self, nodes: TreeBuilder, plan: PlanView | None) -> np.ndarray:
        """Estimated path probability of every candidate, in builder order."""
        tree = nodes.build()
        return plan.path_probs(tree) if plan is not None else AcceptanceModel().path_probs(tree)

    def _seeds_to_feed(self, nodes: TreeBuilder, seed_nodes: list[int], plan: PlanView | None) -> list[int]:
        if not seed_nodes or self.config.seed_feed == 0:
            return []
        path = self._path_probs(nodes, plan)
        order = best_first_order(nodes.parents, path)  # ancestor-closed by construction
        plausible = [i for i in order[: self.config.seed_feed] if path[i] >= self.config.seed_min_path]
        keep = set(plausible)
        return sorted(i for i in plausible if nodes.parents[i] < 0 or nodes.parents[i] in keep)

    def _frontier(self, nodes: TreeBuilder, slots: dict[int, int], plan: PlanView | None) -> list[int]:
        """The ``beam`` unfed candidates (whose parents are fed) with the highest path probability."""
        path = self._path_probs(nodes, plan)
        ready = [
            i
            for i in range(len(nodes))
            if i not in slots and (nodes.parents[i] < 0 or nodes.parents[i] in slots)
        ]
        ready.sort(key=lambda i: -path[i])
        return [i for i in ready[: self.config.beam] if path[i] > self.config.min_frontier_prob]

    # -- forwards ----------------------------------------------------------------------------------
    def _forward(self, ids: list[int], mask: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        with torch.inference_mode(), self.plan.forward(len(ids)):
            if self.lean is not None:
                logits = self.lean.forward(ids, self.cache, mask=mask, positions=positions)
            else:
                logits = self.model(
                    input_ids=torch.tensor([ids], device=self.device),
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **with_cache(self.model, self.cache),
                ).logits[0]
        self.forwards += 1
        self.seconds += time.perf_counter() - start
        return logits.float()

    def _catch_up(
        self, nodes: TreeBuilder, slots: dict[int, int], seeds: list[int]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed the pending committed tokens (causal among themselves) and the given seed nodes (each sees
        the committed text and its seed ancestors). Returns the root's logits [V] and the seeds' [m, V]."""
        n = len(self.pending)
        mask, positions = attention_inputs(
            nodes.build(), self.past, chain=n, feed=seeds, dtype=self.dtype, device=self.device
        )
        logits = self._forward(self.pending + [nodes.tokens[s] for s in seeds], mask, positions)
        self.fed_pending = True
        for j, node in enumerate(seeds):
            slots[node] = self.past + n + j
        return logits[n - 1], logits[n:]

    def _feed(self, nodes: TreeBuilder, slots: dict[int, int], frontier: list[int]) -> torch.Tensor:
        """One tree-attention forward of ``frontier`` (nodes whose parents are fed); returns logits [m, V]."""
        cached = self.cache.get_seq_length()
        where = [slots.get(i, -1) for i in range(len(nodes))]
        mask, positions = attention_inputs(
            nodes.build(),
            self.past + len(self.pending),
            chain=0,
            feed=frontier,
            slots=where,
            cached=cached,
            dtype=self.dtype,
            device=self.device,
        )
        logits = self._forward([nodes.tokens[n] for n in frontier], mask, positions)
        for j, node in enumerate(frontier):
            slots[node] = cached + j
        return logits

    @staticmethod
    def _score_children(nodes: TreeBuilder, node: int, probs: torch.Tensor) -> None:
        """The draft's probability of each existing child of a fed ``node`` (probs: [V]), where unknown."""
        for token, child in nodes.children[node].items():
            if math.isnan(nodes.draft_probs[child]) and token < probs.shape[0]:
                nodes.draft_probs[child] = float(probs[token])

    def _add_children(
        self,
        nodes: TreeBuilder,
        node: int,
        logits: torch.Tensor,
        q_dists: list[torch.Tensor],
        plan: PlanView | None,
        probs: torch.Tensor | None = None,
    ) -> None:
        """Score the existing children of a freshly fed node and add its own top-k (or sampled) children.
        probs: softmax of ``logits`` over the vocabulary, where the caller has it."""
        logits = logits[: self.vocab_size]
        if probs is None:
            probs = torch.softmax(logits, -1)
        self._score_children(nodes, node, probs)
        k = self.config.top_k
        if self.sampling.do_sample:
            q = self.sampling.probs(logits[None])[0]
            row = len(q_dists)
            q_dists.append(q)
            # Gumbel-top-k = k sequential draws without replacement from q, in draw order.
            gumbel = -torch.log(
                -torch.log(torch.rand(q.shape, generator=self.generator, device=q.device).clamp_min(1e-20))
            )
            keys = torch.where(q > 0, torch.log(q.clamp_min(1e-30)) + gumbel, torch.full_like(q, -math.inf))
            draws = torch.topk(keys, min(k, int((q > 0).sum()))).indices.tolist()
            for rank, token in enumerate(draws):
                child = nodes.add(token, node, int(Source.DRAFT), float(probs[token]), float(probs[token]))
                nodes.q_rows[child] = row
                nodes.draws[child] = rank
        else:
            top = torch.topk(probs, k)
            for p, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                nodes.add(token, node, int(Source.DRAFT), p, p)
        if plan is not None and node >= 0:
            best = TokenTree([0], [-1], draft_probs=[float(probs.max())], sources=[int(Source.DRAFT)])
            weight = self.config.child_smoothing
            self.child_prob = (1 - weight) * self.child_prob + weight * float(plan.node_probs(best)[0])
