"""Speculative generation: the decoding loop that ties drafters, the budget planner and the verifier together.

One step, for each sequence::

    tree   = drafter.propose(budget)        # TokenTree (the planner keeps the part that pays)
    logits = session.verify(tree)           # one target forward over [root] + tree
    acc    = accept(tree, logits)           # accepted path + bonus token (>= 1 token per step)
    session.commit(acc); drafter.advance(acc.tokens); planner.observe(...)

Greedy output is token-identical to ``model.generate(do_sample=False)``; sampled output follows the
target's own distribution exactly (see :mod:`rasd.verify`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rasd.costmodel import CostCurve, cached_profile, fastest_path_profile
from rasd.drafting.base import Drafter
from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
from rasd.drafting.fused import Fused
from rasd.drafting.lookup import CorpusLookup, PromptLookup
from rasd.fastpath import FastPath, FastPathConfig
from rasd.planner import Planner
from rasd.tree import Source, TokenTree
from rasd.verify import (
    Acceptance,
    SamplingConfig,
    TargetSession,
    accept_greedy,
    accept_sampling,
    check_model,
)

SOURCE_NAMES = {Source.PROMPT: "prompt", Source.CORPUS: "corpus", Source.DRAFT: "draft"}


@dataclass
class GenerationStats:
    """What happened during generation (summed over the batch).

    tokens_per_step: tokens committed by each target forward (accepted + bonus), in order.
    accepted_by_source / proposed_by_source: tree nodes accepted / proposed, per drafter source (a node
        proposed by several sources after fusion counts for each).
    time_*: wall seconds in drafting (draft model and retrieval), verification (target forward and
        acceptance) and in total (including prefill).
    """

    steps: int = 0
    new_tokens: int = 0
    tokens_per_step: list[int] = field(default_factory=list)
    tree_sizes: list[int] = field(default_factory=list)
    accepted_by_source: dict[str, int] = field(default_factory=dict)
    proposed_by_source: dict[str, int] = field(default_factory=dict)
    time_draft: float = 0.0
    time_retrieval: float = 0.0
    time_verify: float = 0.0
    time_prefill: float = 0.0
    time_total: float = 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Mean tokens committed per target forward (1.0 = no speculation gain)."""
        return self.new_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.time_total if self.time_total > 0 else 0.0

    def merge(self, other: GenerationStats) -> None:
        self.steps += other.steps
        self.new_tokens += other.new_tokens
        self.tokens_per_step += other.tokens_per_step
        self.tree_sizes += other.tree_sizes
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

    def __init__(self, eos: Sequence[int], stop_strings: Sequence[str], tokenizer: Any) -> None:
        self.eos = set(eos)
        self.stop_strings = list(stop_strings)
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


class SpeculativeGenerator:
    """A reusable speculative decoder for one target model.

    target:        a Hugging Face causal LM (``sdpa`` or ``eager`` attention).
    draft:         a small causal LM with the same tokenizer (EAGLE-2-style dynamic trees), or None.
    datastore:     a :class:`rasd.Datastore` or the path of a saved one (corpus lookup, REST-style), or None.
    prompt_lookup: retrieve from the prompt and the output so far (PLD-style).
    drafter:       a custom :class:`rasd.drafting.Drafter` instead of the three above.
    planner:       "auto" (measure the target's verification cost once per machine, learn acceptance
                   online, choose tree sizes and whether to draft), a :class:`rasd.planner.Planner`, or None
                   (verify whatever the drafters propose).
    overlap:       run retrieval in a worker thread while the draft model runs.
    fast_path:     route small CPU forwards through rasd's native kernels (:mod:`rasd.fastpath`); "auto"
                   turns it on for fp32 CPU models. Whole forwards with and without it are timed once per
                   machine (cached) and each forward size takes the faster path. It changes speed, not
                   which tokens come out.
    tokenizer:     needed for ``stop_strings`` and to check a datastore's tokenizer.

    With no drafter at all, generation is plain greedy/sampled decoding through the same loop.
    """

    def __init__(
        self,
        target: torch.nn.Module,
        drafter: Drafter | None = None,
        *,
        draft: torch.nn.Module | None = None,
        datastore: Any = None,
        prompt_lookup: bool = False,
        planner: Any = "auto",
        max_tree_nodes: int = 64,
        draft_config: DraftTreeConfig | None = None,
        overlap: bool = False,
        fast_path: bool | str = "auto",
        tokenizer: Any = None,
    ) -> None:
        if max_tree_nodes < 0:
            raise ValueError(f"max_tree_nodes must be >= 0, got {max_tree_nodes}")
        check_model(target)
        if drafter is not None and (draft is not None or datastore is not None or prompt_lookup):
            raise ValueError("pass either a custom drafter or draft/datastore/prompt_lookup, not both")
        self.target = target
        self.max_tree_nodes = max_tree_nodes
        self.tokenizer = tokenizer
        param = next(target.parameters())
        if fast_path == "auto":
            fast_path = param.device.type == "cpu" and param.dtype == torch.float32
        # Prepared now so that kernel weights, calibration and the choice of path per forward size (measured
        # once per machine) are not billed to the first step.
        self.fast_path = FastPath.for_model(target, FastPathConfig()) if fast_path else None
        if self.fast_path is not None:
            fastest_path_profile(target, self.fast_path)
        if planner == "auto":
            wants_planner = drafter is not None or draft is not None or datastore is not None or prompt_lookup
            planner = Planner(CostCurve.from_profile(self._verify_profile())) if wants_planner else None
        self.planner = planner
        if drafter is None:
            drafter = self._assemble(draft, datastore, prompt_lookup, draft_config, overlap, fast_path)
        self.drafter = drafter

    def _verify_profile(self) -> dict[int, float]:
        """T(n) of one verification forward on the path that will run (see :meth:`FastPath.serves`)."""
        if self.fast_path is None:
            return cached_profile(self.target, fast_path=False)
        return fastest_path_profile(self.target, self.fast_path)

    def _assemble(self, draft, datastore, prompt_lookup, draft_config, overlap, fast_path) -> Drafter | None:
        retrievers: list[Drafter] = []
        if prompt_lookup:
            retrievers.append(PromptLookup())
        if datastore is not None:
            retrievers.append(CorpusLookup(datastore, tokenizer=self.tokenizer))
        draft_drafter = None
        if draft is not None:
            target_vocab = self.target.get_output_embeddings().weight.shape[0]
            draft_vocab = draft.get_output_embeddings().weight.shape[0]
            if abs(target_vocab - draft_vocab) > 1024:
                raise ValueError(
                    f"the draft model's vocabulary ({draft_vocab}) does not match the target's "
                    f"({target_vocab}): a draft model must use the target's tokenizer"
                )
            draft_drafter = DraftModel(
                draft, config=draft_config, planner=self.planner, fast_path="auto" if fast_path else False
            )
        if not retrievers and draft_drafter is None:
            return None
        return Fused(retrievers, draft_drafter, planner=self.planner, overlap=overlap)

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
        stop_strings: Sequence[str] = (),
        streamer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
    ) -> GenerationResult:
        """Generate for a batch of prompts. Arguments mirror HF ``generate``.

        input_ids: [B, L] (or [L]); with ``attention_mask`` [B, L], padded positions (0) are dropped per
        row. Rows are decoded one after another; the output rows are the input rows followed by the new
        tokens and ``pad_token_id`` after EOS, as in HF. ``streamer`` (HF streamer protocol) requires B = 1.
        """
        ids = torch.as_tensor(input_ids)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError("input_ids must have shape [B, L] with L >= 1 (the prompt is empty)")
        if streamer is not None and ids.shape[0] != 1:
            raise ValueError("streaming supports batch size 1")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        sampling = SamplingConfig.resolve(
            self.target, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p
        )
        gen_cfg = self.target.generation_config
        eos_list = self._eos_list(eos_token_id)
        pad = pad_token_id if pad_token_id is not None else gen_cfg.pad_token_id
        if pad is None:
            pad = eos_list[0] if eos_list else 0
        if generator is None and sampling.do_sample:
            generator = self._seeded_generator(seed)
        stopper = _StopChecker(eos_list, stop_strings, self.tokenizer)

        stats = GenerationStats()
        rows = []
        for b in range(ids.shape[0]):
            row = ids[b]
            prompt = row[attention_mask[b].bool()] if attention_mask is not None else row
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
        width = max(len(r) for r in rows)
        sequences = torch.full((len(rows), width), pad, dtype=torch.long)
        for b, r in enumerate(rows):
            sequences[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        return GenerationResult(sequences.to(ids.device), stats)

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
        ids = torch.as_tensor(input_ids)
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
        eos_list = self._eos_list(kwargs.pop("eos_token_id", None))
        stopper = _StopChecker(eos_list, kwargs.pop("stop_strings", ()), self.tokenizer)
        generator = kwargs.pop("generator", None)
        if kwargs:
            raise TypeError(f"unexpected arguments: {sorted(kwargs)}")
        if generator is None and sampling.do_sample:
            generator = self._seeded_generator(seed)
        if ids.numel() == 0:
            raise ValueError("input_ids is empty: the prompt needs at least one token")
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
        session = TargetSession(self.target, prompt, fast_path=self.fast_path)
        prompt_tokens = prompt.tolist()
        if self.drafter is not None:
            if hasattr(self.drafter, "configure_sampling"):
                self.drafter.configure_sampling(sampling, generator)
            self.drafter.begin(prompt_tokens)
        retrieval_before = getattr(self.drafter, "retrieval_seconds", 0.0)
        stats.time_prefill += time.perf_counter() - start
        generated: list[int] = []
        try:
            while len(generated) < max_new_tokens:
                t0 = time.perf_counter()
                budget = self.max_tree_nodes
                tree = TokenTree.empty()
                if self.drafter is not None and budget > 0:
                    tree = self.drafter.propose(budget)
                if self.planner is not None and getattr(self.drafter, "planner", None) is not self.planner:
                    # A drafter that does not plan for itself: keep the prefix that pays (maybe nothing).
                    tree = self.planner.trim(tree, time.perf_counter() - t0, max_nodes=budget)
                if len(tree) > budget:
                    raise RuntimeError(f"drafter returned {len(tree)} nodes for a budget of {budget}")
                t1 = time.perf_counter()
                logits = session.verify(tree)
                acc: Acceptance = (
                    accept_sampling(tree, logits, sampling, generator)
                    if sampling.do_sample
                    else accept_greedy(tree, logits)
                )
                session.commit(acc)
                t2 = time.perf_counter()
                stats.time_draft += t1 - t0
                stats.time_verify += t2 - t1
                stats.steps += 1
                stats.tree_sizes.append(len(tree))
                self._credit(tree, acc, stats)
                if self.planner is not None:
                    self.planner.observe(
                        tree,
                        acc,
                        draft_seconds=t1 - t0,
                        verify_seconds=t2 - t1,
                        drafted=bool(getattr(self.drafter, "last_drafted", False)),
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
                    self.drafter.advance(acc.tokens)
        finally:
            retrieval = getattr(self.drafter, "retrieval_seconds", 0.0) - retrieval_before
            stats.time_retrieval += retrieval
            stats.time_draft -= retrieval  # time_draft counted all of propose(); keep the two apart
            stats.time_total += time.perf_counter() - start

    @staticmethod
    def _credit(tree: TokenTree, acc: Acceptance, stats: GenerationStats) -> None:
        for mask in tree.sources.tolist():
            for name in _source_names(mask):
                stats.proposed_by_source[name] = stats.proposed_by_source.get(name, 0) + 1
        for node in acc.path:
            for name in _source_names(int(tree.sources[node])):
                stats.accepted_by_source[name] = stats.accepted_by_source.get(name, 0) + 1


def generate(
    model: torch.nn.Module,
    input_ids: torch.Tensor | Sequence[int],
    *,
    draft_model: torch.nn.Module | None = None,
    datastore: Any = None,
    prompt_lookup: bool = True,
    tokenizer: Any = None,
    max_tree_nodes: int = 64,
    overlap: bool = False,
    **generate_kwargs: Any,
) -> GenerationResult:
    """Speculative ``generate`` in one call: RASD when given a draft model and/or a datastore.

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
