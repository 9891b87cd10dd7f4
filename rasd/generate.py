"""Speculative generation: the decoding loop that ties drafters, the budget planner and the verifier together.

One step, for each sequence (the step contract is :mod:`rasd.drafting.base`)::

    proposal = drafter.propose(StepBudget(max_nodes, planner.view()))   # Proposal: tree + facts
    tree     = planner.trim(proposal.tree)      # the best-first prefix that pays (the loop alone trims)
    logits   = session.verify(tree)             # one target forward over [root] + tree
    acc      = accept(tree, logits)             # accepted path + bonus token (>= 1 token per step)
    session.commit(acc); planner.observe(...); drafter.advance(StepResult(...))

The loop owns the planner and reads nothing from a drafter but its Proposal.

Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled output follows the
target's own distribution exactly (see :mod:`rasd.verify`).
"""

from __future__ import annotations

import numbers
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rasd.costmodel import CostCurve, forward_plan
from rasd.drafting.base import DraftContext, Drafter, Proposal, StepBudget, StepResult
from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
from rasd.drafting.fused import Fused
from rasd.drafting.lookup import CorpusLookup, PromptLookup
from rasd.drafting.recycling import RecyclingConfig, TokenRecycling
from rasd.fastpath import FastPath, FastPathConfig, ForwardPlan
from rasd.planner import AcceptanceModel, Planner
from rasd.tree import Source, TokenTree, best_first_order, keep_first
from rasd.verify import (
    Acceptance,
    SamplingConfig,
    TargetSession,
    accept,
    check_model,
)

SOURCE_NAMES = {
    Source.PROMPT: "prompt",
    Source.CORPUS: "corpus",
    Source.DRAFT: "draft",
    Source.RECYCLE: "recycle",
}


@dataclass
class GenerationStats:
    """What happened during generation (summed over the batch). With ``overlap=True`` retrieval runs beside
    the draft model, so time_draft + time_retrieval can exceed the wall time spent proposing."""

    # Target forwards: the prefill (its logits give the first token: a step of tree size 0), one per step.
    steps: int = 0
    # Steps where the draft model expanded the tree (0 with a draft model: it was not run for the request,
    # its prefill would have cost more than it saves at this max_new_tokens, or retrieval paid more).
    drafted_steps: int = 0
    new_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)  # committed per forward (accepted + bonus)
    tree_sizes: list[int] = field(default_factory=list)  # nodes verified per forward
    # Tree nodes accepted / proposed per drafter source (a node several sources proposed counts for each).
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    proposed_by_source: dict[str, int] = field(default_factory=dict)
    time_draft: float = 0.0  # draft-model work: its forwards and tree bookkeeping
    time_retrieval: float = 0.0  # retrieval work: datastores, the recycling table
    time_verify: float = 0.0  # target forwards and acceptance
    time_prefill: float = 0.0  # the prompt's prefill and the drafters' set-up (a deferred draft prefill too)
    # Per request whose draft model ran: new tokens committed before its prefill (0: with the prompt's;
    # n > 0: deferred until retrieval-only steps measured that it pays). Requests that never ran it: absent.
    draft_prefill_after: list[int] = field(default_factory=list)
    # Per request whose drafter holds a draft model and proposed at least once: what the draft chose at the
    # request's start, "run", "probe" or "skip" (rasd.drafting.base.DRAFT_DECISIONS). A "probe" whose
    # prefill paid shows up in draft_prefill_after as n > 0; one that never paid, nowhere else.
    draft_decisions: list[str] = field(default_factory=list)
    time_total: float = 0.0  # wall time of the whole call

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens committed per target forward (1.0 = no speculation gain)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def merge(self, other: GenerationStats) -> None:
        self.steps += other.steps
        self.drafted_steps += other.drafted_steps
        self.new_tokens += other.new_tokens
        self.tokens_per_step += other.tokens_per_step
        self.tree_sizes += other.tree_sizes
        self.draft_prefill_after += other.draft_prefill_after
        self.draft_decisions += other.draft_decisions
        for mine, theirs in (
            (self.accepted_by_source, other.accepted_by_source),
            (self.proposed_by_source, other.proposed_by_source),
        ):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        for name in ("time_draft", "time_retrieval", "time_verify", "time_prefill", "time_total"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "drafted_steps": self.drafted_steps,
            "new_tokens": self.new_tokens,
            "mean_accepted_length": self.mean_accepted_length,
            "tokens_per_second": self.tokens_per_second,
            "accepted_by_source": dict(self.accepted_by_source),
            "proposed_by_source": dict(self.proposed_by_source),
            "mean_tree_size": float(np.mean(self.tree_sizes)) if self.tree_sizes else 0.0,
            "time_draft": self.time_draft,
            "time_retrieval": self.time_retrieval,
            "time_verify": self.time_verify,
            "time_prefill": self.time_prefill,
            "draft_prefill_after": list(self.draft_prefill_after),
            "draft_decisions": list(self.draft_decisions),
            "time_total": self.time_total,
        }


@dataclass(frozen=True)
class GenerationResult:
    """sequences: [B, L + new] like HF ``generate`` (prompt, new tokens, then pad after EOS)."""

    sequences: torch.Tensor
    stats: GenerationStats


def _source_names(mask: int) -> list[str]:
    return [name for flag, name in SOURCE_NAMES.items() if mask & flag] or ["other"]


class _StopChecker:
    """EOS ids and stop strings. A stop string ends generation at the token that completes it."""

    def __init__(self, eos: Sequence[int], stop_strings: str | Sequence[str], tokenizer: Any) -> None:
        self.eos = set(eos)
        # A single string is one stop string (as in HF), not a sequence of one-character stop strings.
        self.stop_strings = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise TypeError("stop_strings must be a string or a list of non-empty strings")
        if self.stop_strings and tokenizer is None:
            raise ValueError("stop_strings need a tokenizer: pass tokenizer=...")
        self.tokenizer = tokenizer

    def cut(self, context: list[int], new: list[int]) -> tuple[list[int], bool]:
        """The prefix of ``new`` to keep, and whether generation must stop after it.

        context: the tokens before ``new`` (prompt and output so far; only its tail is read). As in HF's
        ``StopStringCriteria``, a stop string matches when it occurs in the decoded text and overlaps the
        newest token, even if it starts in the prompt.
        """
        for i, tok in enumerate(new):
            if tok in self.eos:
                return new[: i + 1], True
        if self.stop_strings:
            width = max(len(s) for s in self.stop_strings) + 8  # tokens are >= 1 character
            for i in range(len(new)):
                tail = (context + new[: i + 1])[-width:]
                before = len(self.tokenizer.decode(tail[:-1], skip_special_tokens=False))
                text = self.tokenizer.decode(tail, skip_special_tokens=False)
                for s in self.stop_strings:
                    j = text.find(s)
                    while j >= 0:
                        if j + len(s) > before:
                            return new[: i + 1], True
                        j = text.find(s, j + 1)
        return new, False


def _warn_half_precision(target: torch.nn.Module) -> None:
    """Say once per generator that a bf16/fp16 target is equal to HF ``generate`` only up to near-ties."""
    dtype = next(target.parameters()).dtype
    if dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"the target runs in {dtype}: greedy output equals HF generate token for token in float32 only. "
            "In 16-bit formats the attention and matmul kernels round differently for different numbers "
            "of tokens per forward (a tree of n tokens, a prompt of L-1 tokens vs HF's L), so where two "
            "candidates' logits tie within 16-bit rounding the chosen token can differ (measured: SmolLM2 "
            "bf16 on CPU, 2 of 4 prompts from new token 6-7, even with speculation off). Load the target in "
            "float32 for exact equality; sampling stays distributed as the 16-bit target.",
            RuntimeWarning,
            stacklevel=3,
        )


def _row_prompts(ids: torch.Tensor, attention_mask: Any) -> list[torch.Tensor]:
    """Each row of ``ids`` [B, L] without its masked (0) positions; checks the mask's shape and that no
    row is empty."""
    if attention_mask is not None:
        attention_mask = torch.as_tensor(attention_mask)
        if attention_mask.shape != ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, input_ids {tuple(ids.shape)}"
            )
    prompts = []
    for b in range(ids.shape[0]):
        prompt = ids[b][attention_mask[b].bool()] if attention_mask is not None else ids[b]
        if prompt.numel() == 0:
            raise ValueError(f"row {b} of input_ids has no unmasked token (the prompt is empty)")
        prompts.append(prompt)
    return prompts


def _pad_id(target: torch.nn.Module, pad_token_id: int | None, eos_list: Sequence[int]) -> int:
    """The id that fills rows after EOS, as HF: pad_token_id, the model's pad, its first EOS, else 0."""
    pad = pad_token_id if pad_token_id is not None else target.generation_config.pad_token_id
    if pad is None:
        pad = eos_list[0] if eos_list else 0
    return pad


def _padded_rows(rows: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """[B, max len] long tensor of ``rows``, right-filled with ``pad``."""
    width = max(len(r) for r in rows)
    sequences = torch.full((len(rows), width), pad, dtype=torch.long)
    for b, r in enumerate(rows):
        sequences[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    return sequences.to(device)


class SpeculativeGenerator:
    """A reusable speculative decoder for one target model.

    target:        a Hugging Face causal LM (``sdpa`` or ``eager`` attention).
    draft:         a small causal LM with the same tokenizer (EAGLE-2-style dynamic trees), or None.
    datastore:     a :class:`rasd.Datastore` or the path of a saved one (corpus lookup, REST-style), or None.
    prompt_lookup: retrieve from the prompt and the output so far (PLD-style). Default: on, unless a custom
                   ``drafter`` is given.
    recycling:     Token Recycling: propose from the target's own top-k successors of every token, kept from
                   earlier verifications (no model forward); True or a :class:`RecyclingConfig`.
    drafter:       a custom :class:`rasd.drafting.Drafter` instead of the built-in ones above.
    planner:       "auto" (measure the target's verification cost once per machine, learn acceptance
                   online, choose tree sizes and whether to draft), a :class:`rasd.planner.Planner`, or None
                   (verify what the drafters propose, cut to ``max_tree_nodes``). With a planner the trees
                   verified depend on measured timings and on what earlier calls taught it, and a sampled
                   output depends on the trees (each is an exact sample of the target either way), so
                   ``seed`` reproduces a sampled output token for token only with ``planner=None`` and
                   deterministic drafters.
    overlap:       run retrieval in a worker thread while the draft model runs.
    fast_path:     route small CPU forwards through rasd's native kernels (:mod:`rasd.fastpath`); "auto"
                   turns it on for fp32 CPU models. Whole forwards with and without it are timed once per
                   machine (cached) and each forward size takes the faster path. Speed only, never tokens.
                   A :class:`rasd.fastpath.FastPathConfig` (exact: ``weights="fp32"``) sets the target's
                   path, e.g. ``FastPathConfig(exact_bf16=False)``: no bf16 copies of weights that are bf16
                   values (a bf16 checkpoint loaded in fp32), which halve a verification's weight traffic
                   with bit-identical products but cost 2 bytes per weight.
    tokenizer:     needed for ``stop_strings``; checks a datastore's and the models' vocabularies.

    With no drafter at all, generation is plain greedy/sampled decoding through the same loop.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: Drafter | None = None,
        *,
        draft: torch.nn.Module | None = None,
        datastore: Any = None,
        prompt_lookup: bool | None = None,
        recycling: bool | RecyclingConfig = False,
        planner: Any = "auto",
        max_tree_nodes: int = 64,
        draft_config: DraftTreeConfig | None = None,
        overlap: bool = False,
        fast_path: bool | str | FastPathConfig = "auto",
        tokenizer: Any = None,
    ) -> None:
        if isinstance(max_tree_nodes, bool) or not isinstance(max_tree_nodes, numbers.Integral):
            raise TypeError(f"max_tree_nodes must be an int, got {max_tree_nodes!r}")
        if max_tree_nodes < 0:
            raise ValueError(f"max_tree_nodes must be >= 0, got {max_tree_nodes}")
        check_model(target)
        _warn_half_precision(target)
        builtin = draft is not None or datastore is not None or prompt_lookup or recycling
        if drafter is not None and builtin:
            raise ValueError(
                "pass either a custom drafter or draft/datastore/prompt_lookup/recycling, not both"
            )
        if drafter is not None and not isinstance(drafter, Drafter):
            raise TypeError(
                f"drafter must implement rasd.drafting.Drafter (begin, propose, advance); got {type(drafter)}"
            )
        if prompt_lookup is None:
            prompt_lookup = drafter is None
        self.target = target
        self.max_tree_nodes = int(max_tree_nodes)
        self.tokenizer = tokenizer
        param = next(target.parameters())
        target_path = FastPathConfig()
        if isinstance(fast_path, FastPathConfig):
            if fast_path.weights != "fp32" or fast_path.backend != "kernel":
                raise ValueError(
                    "the target's fast path must be exact: FastPathConfig(weights='fp32', backend='kernel'), "
                    f"got {fast_path.tag} (lower-precision weights are for draft models: DraftTreeConfig)"
                )
            target_path, fast_path = fast_path, "auto"
        if fast_path == "auto":
            fast_path = param.device.type == "cpu" and param.dtype == torch.float32
        if tokenizer is not None:
            _check_vocabulary(target, tokenizer, "target")
        # Measured once per machine and model (cached), before the first request, so that the first step
        # is not billed for it: the path per forward size and the cost curve the planner prices trees by.
        fast = [FastPath.for_model(target, target_path)] if fast_path else []
        wants = drafter is not None or builtin
        # Without a fast path nor a planner there is nothing to choose or price: no measurement.
        self.plan: ForwardPlan = (
            forward_plan(target, fast, threads=1 if fast else None)
            if fast or (planner == "auto" and wants)
            else ForwardPlan()
        )
        if planner == "auto":
            planner = Planner(CostCurve.from_profile(self.plan.profile())) if wants else None
        if planner is not None and not isinstance(planner, Planner):
            raise TypeError(f"planner must be 'auto', a rasd.planner.Planner or None, got {planner!r}")
        self.planner: Planner | None = planner
        # The built-in drafters' parts, from which the batched loop (rasd.batch) builds one drafter per row;
        # None with a custom drafter instance, which cannot be copied.
        self.drafter_parts: dict[str, Any] | None = None
        if drafter is None:
            self.drafter_parts = {
                "draft": draft,
                "datastore": datastore,
                "prompt_lookup": prompt_lookup,
                "recycling": recycling,
                "draft_config": draft_config,
                "overlap": overlap,
                "fast_path": fast_path,
            }
            drafter = self._assemble(
                draft, datastore, prompt_lookup, recycling, draft_config, overlap, fast_path
            )
        self.drafter = drafter
        self._batched: Any = None  # the rasd.batch.BatchedGenerator over this generator, made on first use

    def _assemble(
        self, draft, datastore, prompt_lookup, recycling, draft_config, overlap, fast_path
    ) -> Drafter | None:
        retrievers: list[Drafter] = []
        if prompt_lookup:
            retrievers.append(PromptLookup())
        if datastore is not None:
            retrievers.append(CorpusLookup(datastore, tokenizer=self.tokenizer))
        if recycling:
            config = recycling if isinstance(recycling, RecyclingConfig) else RecyclingConfig()
            retrievers.append(TokenRecycling(self.target.get_output_embeddings().weight.shape[0], config))
        draft_drafter = None
        if draft is not None:
            _check_draft(self.target, draft, self.tokenizer)
            draft_drafter = DraftModel(draft, config=draft_config, fast_path="auto" if fast_path else False)
        if not retrievers and draft_drafter is None:
            return None
        if len(retrievers) == 1 and draft_drafter is None:
            return retrievers[0]
        return Fused(retrievers, draft_drafter, overlap=overlap)

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int],
        *,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 128,
        do_sample: bool | None = None,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop_strings: str | Sequence[str] = (),
        streamer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        batch: bool | str = "auto",
    ) -> GenerationResult:
        """Generate for a batch of prompts. Arguments mirror HF ``generate``.

        input_ids: [B, L] (or [L]) integer token ids; with ``attention_mask`` [B, L], padded positions (0)
        are dropped per row. The output rows are the input rows followed by the new tokens and
        ``pad_token_id`` after EOS, as in HF. ``streamer`` (HF streamer protocol) requires B = 1.
        ``batch``: True verifies all rows' trees in one target forward per step
        (:class:`rasd.batch.BatchedGenerator`; its ``BatchStats`` count batched forwards), False decodes the
        rows one after another; "auto" batches when B > 1, unless the generator has a custom drafter
        instance (which cannot be copied per row).
        """
        ids = _as_ids(input_ids, self.target)
        if ids.dim() == 1:
            ids = ids[None]
        if streamer is not None and ids.shape[0] != 1:
            raise ValueError("streaming supports batch size 1")
        if batch not in ("auto", True, False):
            raise ValueError(f"batch must be 'auto', True or False, got {batch!r}")
        if batch is True or (batch == "auto" and ids.shape[0] > 1 and self.drafter_parts is not None):
            if self._batched is None:
                from rasd.batch import BatchedGenerator

                self._batched = BatchedGenerator(self)
            return self._batched.generate(
                ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                min_p=min_p,
                eos_token_id=eos_token_id,
                pad_token_id=pad_token_id,
                stop_strings=stop_strings,
                generator=generator,
                seed=seed,
            )
        prompts = _row_prompts(ids, attention_mask)
        _check_max_new_tokens(max_new_tokens)
        sampling = SamplingConfig.resolve(
            self.target, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        )
        eos_list = self._eos_list(eos_token_id)
        pad = _pad_id(self.target, pad_token_id, eos_list)
        if generator is None and sampling.do_sample:
            generator = self._seeded_generator(seed)
        stopper = _StopChecker(eos_list, stop_strings, self.tokenizer)

        stats = GenerationStats()
        rows = []
        for row, prompt in zip(ids, prompts, strict=True):
            if streamer is not None:
                streamer.put(row.cpu()[None])
            new: list[int] = []
            for chunk in self._decode(prompt, max_new_tokens, sampling, stopper, generator, stats):
                new.extend(chunk)
                if streamer is not None:
                    streamer.put(torch.tensor(chunk))
            if streamer is not None:
                streamer.end()
            rows.append(row.tolist() + new)
        return GenerationResult(_padded_rows(rows, pad, ids.device), stats)

    def stream(
        self,
        input_ids: torch.Tensor | Sequence[int],
        *,
        stats: GenerationStats | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> Iterator[list[int]]:
        """Yield the tokens committed by each step for one prompt (same arguments as :meth:`generate`);
        ``stats``, when given, is filled in as the steps go."""
        ids = _as_ids(input_ids, self.target)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("stream() takes one prompt")
            ids = ids[0]
        sampling = SamplingConfig.resolve(
            self.target,
            **{
                k: kwargs.pop(k)
                for k in ("do_sample", "temperature", "top_k", "top_p", "min_p")
                if k in kwargs
            },
        )
        max_new_tokens = kwargs.pop("max_new_tokens", 128)
        _check_max_new_tokens(max_new_tokens)
        eos_list = self._eos_list(kwargs.pop("eos_token_id", None))
        stopper = _StopChecker(eos_list, kwargs.pop("stop_strings", ()), self.tokenizer)
        generator = kwargs.pop("generator", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if generator is None and sampling.do_sample:
            generator = self._seeded_generator(seed)
        yield from self._decode(ids, max_new_tokens, sampling, stopper, generator, stats or GenerationStats())

    def _eos_list(self, eos_token_id: int | Sequence[int] | None) -> list[int]:
        """The stop ids: the argument, else the target's generation config (as HF ``generate``)."""
        eos = eos_token_id if eos_token_id is not None else self.target.generation_config.eos_token_id
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))

    def _seeded_generator(self, seed: int | None) -> torch.Generator:
        """A generator on the target's device, seeded with ``seed`` or a fresh random seed."""
        generator = torch.Generator(device=next(self.target.parameters()).device)
        generator.manual_seed(seed if seed is not None else int(torch.randint(0, 2**62, ()).item()))
        return generator

    def _fit(self, tree: TokenTree, sunk_seconds: float) -> TokenTree:
        """What the target verifies of a proposal: the planner's best-first prefix that pays, or without a
        planner the first ``max_tree_nodes`` nodes in best-first order of the prior acceptance estimate."""
        if self.planner is not None:
            return self.planner.trim(tree, sunk_seconds, max_nodes=self.max_tree_nodes)
        if len(tree) <= self.max_tree_nodes:
            return tree
        order = best_first_order(tree.parents, AcceptanceModel().path_probs(tree))
        return keep_first(tree, order, self.max_tree_nodes)

    def _decode(
        self,
        prompt: torch.Tensor,
        max_new_tokens: int,
        sampling: SamplingConfig,
        stopper: _StopChecker,
        generator: torch.Generator | None,
        stats: GenerationStats,
    ) -> Iterator[list[int]]:
        start = time.perf_counter()
        _warn_past_positions(self.target, prompt.numel(), max_new_tokens)
        # The prefill also scores the root, as HF generate's does: the first token costs no forward.
        session = TargetSession(self.target, prompt, plan=self.plan, score_root=True)
        prompt_tokens = prompt.tolist()
        view = None
        if self.planner is not None:
            self.planner.begin_request()
            view = self.planner.view()
        if self.drafter is not None:
            self.drafter.begin(DraftContext(tuple(prompt_tokens), sampling, generator, max_new_tokens, view))
        stats.time_prefill += time.perf_counter() - start
        generated: list[int] = []
        first, session.root_logits = session.root_logits, None
        try:
            while len(generated) < max_new_tokens:
                if first is not None:  # the first token, from the prefill's logits: an empty tree's step
                    tree, logits, first = TokenTree.empty(), first, None
                    acc = accept(tree, logits, sampling, generator)
                    session.commit(acc)
                    proposal, t_propose, t_verify, prefilled = Proposal.empty(), 0.0, 0.0, True
                else:
                    # Torch's thread count for this step's small forwards, on this thread only (OpenMP
                    # thread counts are per thread), restored before the step's tokens reach the caller.
                    with self.plan.decode_threads():
                        acc, tree, logits, proposal, t_propose, t_verify = self._step(
                            session, view, sampling, generator
                        )
                    prefilled = False
                _book_draft_reports(proposal, stats)
                stats.time_draft += proposal.draft_seconds
                stats.time_retrieval += proposal.retrieval_seconds
                stats.time_verify += t_verify
                stats.steps += 1
                stats.drafted_steps += int(proposal.drafted)
                stats.tree_sizes.append(len(tree))
                self._credit(tree, acc, stats)
                if self.planner is not None and not prefilled:  # the prefill says nothing of T(n)
                    self.planner.observe(
                        tree, acc, draft_seconds=t_propose, verify_seconds=t_verify, drafted=proposal.drafted
                    )
                context = prompt_tokens[-64:] + generated[-64:]  # a stop string may start in the prompt
                new, stop = stopper.cut(context, acc.tokens[: max_new_tokens - len(generated)])
                stats.tokens_per_step.append(len(new))
                stats.new_tokens += len(new)
                generated.extend(new)
                yield new
                if stop or len(generated) >= max_new_tokens:
                    break
                if self.drafter is not None:
                    self.drafter.advance(StepResult(tuple(acc.tokens), tree, tuple(acc.path), logits))
        finally:
            stats.time_total += time.perf_counter() - start

    def _step(self, session: TargetSession, view, sampling: SamplingConfig, generator):
        """One propose / trim / verify / accept / commit."""
        t0 = time.perf_counter()
        proposal = Proposal.empty()
        if self.drafter is not None and self.max_tree_nodes > 0:
            proposal = self.drafter.propose(StepBudget(self.max_tree_nodes, view))
        setup = _deferred_prefill_seconds(proposal)  # set-up, not this step's drafting
        tree = self._fit(proposal.tree, time.perf_counter() - t0 - setup)
        t1 = time.perf_counter()
        logits = session.verify(tree)
        acc = accept(tree, logits, sampling, generator)
        session.commit(acc)
        return acc, tree, logits, proposal, t1 - t0 - setup, time.perf_counter() - t1

    @staticmethod
    def _credit(tree: TokenTree, acc: Acceptance, stats: GenerationStats) -> None:
        for mask in tree.sources.tolist():
            for name in _source_names(mask):
                stats.proposed_by_source[name] = stats.proposed_by_source.get(name, 0) + 1
        for node in acc.path:
            for name in _source_names(int(tree.sources[node])):
                stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + 1


def _deferred_prefill_seconds(proposal: Proposal) -> float:
    """Seconds of a draft prefill that ran inside this proposal's ``propose`` (0.0: none)."""
    report = proposal.draft_prefill
    return report.seconds if report is not None and report.deferred else 0.0


def _book_draft_reports(proposal: Proposal, stats: GenerationStats) -> None:
    """A proposal's draft-model reports into the stats: its decision, its prefill (a deferred one is set-up
    time)."""
    if proposal.draft_decision is not None:
        stats.draft_decisions.append(proposal.draft_decision)
    if proposal.draft_prefill is not None:
        stats.draft_prefill_after.append(proposal.draft_prefill.after_tokens)
        stats.time_prefill += _deferred_prefill_seconds(proposal)


def _as_ids(input_ids: Any, target: torch.nn.Module) -> torch.Tensor:
    """input_ids as an integer tensor of shape [L] or [B, L] with L >= 1, or a clear error."""
    ids = torch.as_tensor(input_ids)
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise TypeError(
            f"input_ids must be integer token ids, got dtype {ids.dtype} (tokenize the text first)"
        )
    if ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must have shape [L] or [B, L], got {tuple(ids.shape)}")
    if ids.shape[-1] == 0 or ids.numel() == 0:
        raise ValueError("input_ids is empty: the prompt needs at least one token")
    vocab = target.get_output_embeddings().weight.shape[0]
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids contain ids outside [0, {vocab}): wrong tokenizer for this model?")
    return ids.long()


def _check_max_new_tokens(max_new_tokens: Any) -> None:
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral):
        raise TypeError(f"max_new_tokens must be an int, got {max_new_tokens!r}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def _warn_past_positions(target: torch.nn.Module, prompt_length: int, max_new_tokens: int) -> None:
    limit = getattr(target.config, "max_position_embeddings", None)
    if limit is not None and prompt_length + max_new_tokens > limit:
        warnings.warn(
            f"prompt ({prompt_length} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's "
            f"max_position_embeddings ({limit}): outputs past it are unreliable (as with HF generate)",
            stacklevel=4,
        )


def _check_vocabulary(model: torch.nn.Module, tokenizer: Any, role: str) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens but the {role} model's vocabulary is {vocab}: "
            "wrong tokenizer for this model"
        )


def _check_draft(target: torch.nn.Module, draft: torch.nn.Module, tokenizer: Any) -> None:
    """A draft model must use the target's tokenizer. Embedding sizes may legitimately differ (vocabularies
    are padded past the tokenizer: Qwen2.5 has 151,665 tokens, its 0.5B/1.5B embed 151,936 and its 7B
    152,064), so the sizes are compared loosely and the special-token ids and, with a tokenizer, both
    vocabularies are checked. A wrong draft could only slow generation down: its tokens are verified."""
    target_vocab = target.get_output_embeddings().weight.shape[0]
    draft_vocab = draft.get_output_embeddings().weight.shape[0]
    hint = "a draft model must use the target's tokenizer"
    if abs(target_vocab - draft_vocab) > 1024:
        raise ValueError(
            f"the draft's vocabulary ({draft_vocab}) does not match the target's ({target_vocab}): {hint}"
        )
    for name in ("eos_token_id", "bos_token_id"):
        mine, theirs = getattr(target.config, name, None), getattr(draft.config, name, None)
        if mine is not None and theirs is not None and mine != theirs:
            raise ValueError(f"the draft's {name} ({theirs}) differs from the target's ({mine}): {hint}")
    if tokenizer is not None:
        _check_vocabulary(draft, tokenizer, "draft")


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    draft_model: torch.nn.Module | None = None,
    datastore: Any = None,
    prompt_lookup: bool = True,
    recycling: bool | RecyclingConfig = False,
    tokenizer: Any = None,
    max_tree_nodes: int = 64,
    overlap: bool = False,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Speculative ``generate`` in one call: RASD when given a draft model and/or a datastore; prompt lookup
    (on by default) and Token Recycling (``recycling=True``) need neither.

    Same output as ``model.generate(input_ids, ...)`` (token-identical when greedy; the same distribution
    when sampling). ``generate_kwargs`` are those of :meth:`SpeculativeGenerator.generate`
    (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``eos_token_id``,
    ``stop_strings``, ``streamer``, ``seed`` ...). For many calls, build a :class:`SpeculativeGenerator` once.
    """
    generator = SpeculativeGenerator(
        model,
        draft=draft_model,
        datastore=datastore,
        prompt_lookup=prompt_lookup,
        recycling=recycling,
        tokenizer=tokenizer,
        max_tree_nodes=max_tree_nodes,
        overlap=overlap,
    )
    return generator.generate(input_ids, **generate_kwargs)


def pld_generate(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], **kwargs: Any
) -> GenerationResult:
    """Drop-in for HF prompt lookup (``model.generate(..., prompt_lookup_num_tokens=10)``): retrieval from the
    prompt and output only, as trees, sized by the cost model."""
    return generate(model, input_ids, prompt_lookup=True, **kwargs)


def rest_generate(
    model: torch.nn.Module, input_ids: torch.Tensor | Sequence[int], datastore: Any, **kwargs: Any
) -> GenerationResult:
    """Drop-in for REST: retrieval from a corpus datastore only (no draft model, no prompt lookup)."""
    return generate(model, input_ids, datastore=datastore, prompt_lookup=False, **kwargs)
