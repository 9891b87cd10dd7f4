"""Iterative retrieval-augmented generation (In-Context RALM) and RaLMSpec, its speculative-retrieval twin.

Baseline (:class:`IterativeRaLM`): every ``stride`` (k = 4) generated tokens, the last ``query_tokens``
(32) tokens of prompt + output are decoded into a query; the knowledge base's top-1 passage, cut to
``doc_tokens`` (256) tokens, is prepended to the prompt (replacing the previous one) and the next stride is
decoded greedily. Stops at EOS or ``max_new_tokens``.

RaLMSpec (:class:`RaLMSpec`, Zhang et al., ICML 2024): a per-request local cache of passages; for s strides
the cache's top-1 (ranked by the knowledge base's own metric) is used *speculatively*; then the s queries
are verified in one batched knowledge-base call, and at the first mismatch the later strides are rolled
back and the stride is redone with the true passage. Every stride therefore uses exactly the passage the
baseline uses, and greedy output is token-identical to the baseline. Options (each can be switched off):

- ``prefetch``: insert the top-P (P = 20) results of every knowledge-base call into the cache, not top-1;
- ``scheduler="os3"``: the OS³ stride scheduler (:class:`OS3Scheduler`); an int fixes s. ``gamma_cap``
  caps its estimate of the guess accuracy γ (default ``GAMMA_CAP`` = 0.98, not the paper's 0.6: with
  prefetching, guesses were right 94-100 % of the time on every retriever at 44,022 passages, see
  :mod:`rasd.ralmspec.speculation`);
- ``async_verify``: the batched verification may run in a worker thread while the main thread speculates
  the next stride (faiss and torch release the GIL); a verified round keeps that stride, a miss discards
  it. OS³ measures the overlapped rounds' wall time and goes back to synchronous rounds where the worker
  and the LM competing for the cores makes overlapping slower (see :class:`OS3Scheduler`);
- ``reuse_kv`` (beyond the paper; also offered to the baseline): keep the KV cache of passage + prompt +
  output while the passage does not change, instead of recomputing the whole prefix every stride.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rasd.ralmspec.retrievers import Retriever
from rasd.ralmspec.speculation import GAMMA_CAP, OS3Scheduler, speculate, stride_policy
from rasd.verify import with_cache

__all__ = [
    "IterativeRaLM",
    "OS3Scheduler",
    "RaLMConfig",
    "RaLMOutput",
    "RaLMSpec",
    "RaLMStats",
    "eos_ids",
    "stride_policy",
]


@dataclass
class RaLMConfig:
    """stride: tokens generated per retrieval (k). query_tokens: tokens of context forming a query.
    doc_tokens: passage length cap. max_new_tokens: generation cap. reuse_kv: see module docstring."""

    stride: int = 4
    query_tokens: int = 32
    doc_tokens: int = 256
    max_new_tokens: int = 128
    reuse_kv: bool = False

    def __post_init__(self) -> None:
        for name in ("stride", "query_tokens", "doc_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


@dataclass
class RaLMStats:
    """Per request. strides: LM strides kept in the output; kb_calls / kb_queries: knowledge-base calls and
    the queries they carried; hits / misses: speculated passages confirmed / refuted; rollback_tokens:
    generated tokens thrown away; chosen_strides: s of every round (0: a plain step, the baseline's: OS³
    judged that speculation would not pay); plain_steps: verified steps taken without speculating (the first
    step is one); overlapped_rounds: rounds whose verification ran in the worker thread (async);
    lm_forwards: KNN-LM forwards after the prompt (fewer than tokens when drafts run ahead); times in
    seconds."""

    strides: int = 0
    kb_calls: int = 0
    kb_queries: int = 0
    hits: int = 0
    misses: int = 0
    plain_steps: int = 0
    lm_forwards: int = 0
    rollback_tokens: int = 0
    overlapped_rounds: int = 0
    chosen_strides: list[int] = field(default_factory=list)
    time_generation: float = 0.0
    time_retrieval: float = 0.0
    time_cache: float = 0.0
    time_total: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / (self.hits + self.misses) if self.hits + self.misses else 0.0

    @property
    def documents_per_stride(self) -> float:
        """Knowledge-base queries per kept stride (1.0 for the baseline)."""
        return self.kb_queries / self.strides if self.strides else 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__) | {
            "hit_rate": self.hit_rate,
            "documents_per_stride": self.documents_per_stride,
        }


@dataclass
class RaLMOutput:
    tokens: list[int]  # the generated tokens (prompt excluded)
    documents: list[int]  # the passage id used by every kept stride
    stats: RaLMStats


@dataclass
class _State:
    """The LM state after a stride: its passage and, with reuse_kv, the KV cache holding ``length`` tokens
    (the passage, prompt and output except the last generated token)."""

    doc: int
    cache: Any = None
    length: int = 0


def eos_ids(model: torch.nn.Module) -> set[int]:
    """The token ids that end generation for ``model`` (its generation config's eos, one id or several)."""
    eos = model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


class _StrideLM:
    """Greedy decoding of one stride with a given passage prepended."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, config: RaLMConfig, retriever: Retriever
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.retriever = retriever
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model)
        self._doc_ids: dict[int, list[int]] = {}
        self._sep = tokenizer("\n\n", add_special_tokens=False).input_ids

    def doc_ids(self, doc: int) -> list[int]:
        if doc not in self._doc_ids:
            ids = self.tokenizer(self.retriever.passages[doc], add_special_tokens=False).input_ids
            self._doc_ids[doc] = ids[: self.config.doc_tokens] + self._sep
        return self._doc_ids[doc]

    def query(self, context: list[int]) -> str:
        return self.tokenizer.decode(context[-self.config.query_tokens :], skip_special_tokens=True)

    @torch.inference_mode()
    def stride(
        self, doc: int, prev: _State | None, prompt: list[int], generated: list[int], n: int
    ) -> tuple[list[int], _State]:
        from transformers import DynamicCache

        prefix = self.doc_ids(doc) + prompt + generated
        if self.config.reuse_kv and prev is not None and prev.doc == doc and prev.cache is not None:
            cache = prev.cache
            extra = cache.get_seq_length() - prev.length
            if extra:  # back to that stride's end (a later, rolled-back stride extended it)
                cache.crop(-extra)
            feed = prefix[prev.length :]
        else:
            cache = DynamicCache()
            feed = prefix
        new: list[int] = []
        fed = len(prefix) - len(feed)
        for _ in range(n):
            x = torch.tensor([feed], device=self.device)
            logits = self.model(input_ids=x, use_cache=True, **with_cache(self.model, cache)).logits
            fed += len(feed)
            token = int(logits[0, -1].argmax())
            new.append(token)
            if token in self.eos:
                break
            feed = [token]
        return new, _State(doc, cache if self.config.reuse_kv else None, fed)


def _done(generated: list[int], lm: Any, limit: int) -> bool:
    """``limit`` tokens generated, or the last one is an eos of ``lm`` (anything with an ``eos`` set)."""
    return len(generated) >= limit or (bool(generated) and generated[-1] in lm.eos)


class IterativeRaLM:
    """The baseline: one knowledge-base call (top-1) per stride."""

    def __init__(
        self, model: torch.nn.Module, tokenizer: Any, retriever: Retriever, config: RaLMConfig | None = None
    ):
        self.config = config or RaLMConfig()
        self.retriever = retriever
        self.lm = _StrideLM(model, tokenizer, self.config, retriever)

    def generate(self, prompt: list[int]) -> RaLMOutput:
        if not prompt:
            raise ValueError("the prompt is empty")
        cfg, lm, stats = self.config, self.lm, RaLMStats()
        start = time.perf_counter()
        generated: list[int] = []
        docs: list[int] = []
        state: _State | None = None
        while not _done(generated, lm, cfg.max_new_tokens):
            t0 = time.perf_counter()
            ids, _ = self.retriever.search([lm.query(prompt + generated)], 1)
            t1 = time.perf_counter()
            doc = int(ids[0, 0])
            new, state = lm.stride(
                doc, state, prompt, generated, min(cfg.stride, cfg.max_new_tokens - len(generated))
            )
            stats.time_retrieval += t1 - t0
            stats.time_generation += time.perf_counter() - t1
            stats.kb_calls += 1
            stats.kb_queries += 1
            stats.strides += 1
            generated += new
            docs.append(doc)
        stats.time_total = time.perf_counter() - start
        return RaLMOutput(generated, docs, stats)


class _LocalCache:
    """The passages seen by this request; top-1 by the knowledge base's own metric."""

    def __init__(self, retriever: Retriever) -> None:
        self.retriever = retriever
        self.ids: list[int] = []
        self._seen: set[int] = set()

    def add(self, ids: np.ndarray) -> None:
        for i in np.asarray(ids).reshape(-1).tolist():
            if i >= 0 and i not in self._seen:
                self._seen.add(i)
                self.ids.append(i)

    def top1(self, query: str) -> int:
        scores = self.retriever.score(query, self.ids)
        return self.ids[int(np.argmax(scores))]


class RaLMSpec:
    """Speculative retrieval for iterative RaLM; output token-identical to :class:`IterativeRaLM` with the
    same config (see module docstring for the options)."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer: Any,
        retriever: Retriever,
        config: RaLMConfig | None = None,
        *,
        prefetch: int = 20,
        scheduler: str | int = "os3",
        async_verify: bool = False,
        gamma_cap: float = GAMMA_CAP,
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (1 = no prefetching), got {prefetch}")
        stride_policy(scheduler, gamma_cap=gamma_cap)  # validates the options
        self.config = config or RaLMConfig()
        self.retriever = retriever
        self.prefetch = prefetch
        self.scheduler = scheduler
        self.async_verify = async_verify
        self.gamma_cap = gamma_cap
        self.lm = _StrideLM(model, tokenizer, self.config, retriever)
        self._pool = ThreadPoolExecutor(max_workers=1) if async_verify else None
        self._last_policy: Any = None  # the last request's stride policy: the next one starts from it

    def generate(self, prompt: list[int]) -> RaLMOutput:
        if not prompt:
            raise ValueError("the prompt is empty")
        stats = RaLMStats()
        start = time.perf_counter()
        task = _RaLMTask(self, prompt)
        policy = stride_policy(
            self.scheduler,
            async_verify=self.async_verify,
            gamma_cap=self.gamma_cap,
            previous=self._last_policy,
        )
        docs = speculate(task, policy, stats, self._pool)
        self._last_policy = policy
        stats.time_total = time.perf_counter() - start
        return RaLMOutput(task.generated, docs, stats)


class _RaLMTask:
    """One RaLMSpec request as a :class:`~rasd.ralmspec.speculation.Speculation`: a step is one stride of
    ``config.stride`` tokens with one passage; the context is the query text; the cache is the passages this
    request's knowledge-base calls returned (top ``prefetch`` each)."""

    def __init__(self, spec: RaLMSpec, prompt: list[int]) -> None:
        self.spec, self.lm, self.prompt = spec, spec.lm, prompt
        self.limit = spec.config.max_new_tokens
        self.cache = _LocalCache(spec.retriever)
        self.generated: list[int] = []
        self.state: _State | None = None

    def done(self) -> bool:
        return _done(self.generated, self.lm, self.limit)

    def context(self) -> str:
        return self.lm.query(self.prompt + self.generated)

    def query(self, context: str) -> str:
        return context

    def guess(self, context: str) -> int:
        return self.cache.top1(context)

    def answer(self, context: str, result: np.ndarray) -> int:
        return int(result[0])

    def commit(self, doc: int) -> tuple[int, _State | None]:
        mark = (len(self.generated), self.state)
        n = min(self.spec.config.stride, self.limit - len(self.generated))
        new, self.state = self.lm.stride(doc, self.state, self.prompt, self.generated, n)
        self.generated = self.generated + new
        return mark

    def rollback(self, mark: tuple[int, _State | None]) -> int:
        start, self.state = mark
        discarded = len(self.generated) - start
        self.generated = self.generated[:start]
        return discarded

    def search(self, queries: list[str]) -> np.ndarray:
        return self.spec.retriever.search(queries, self.spec.prefetch)[0]

    def prepare(self, queries: list[str]) -> None:
        """Embed queries on the calling thread (the worker then only searches: HF tokenizers are not safe to
        call from two threads at once)."""
        encoder = getattr(self.spec.retriever, "encoder", None)
        if encoder is not None:
            encoder.encode_queries(queries)

    def learn(self, result: np.ndarray) -> None:
        self.cache.add(result)
