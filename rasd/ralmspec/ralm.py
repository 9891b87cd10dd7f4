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
- ``scheduler="os3"``: the OS³ stride scheduler (:class:`OS3Scheduler`); an int fixes s;
- ``async_verify``: the batched verification runs in a worker thread while the main thread speculates the
  next stride (faiss and torch release the GIL); a verified round keeps that stride, a miss discards it;
- ``reuse_kv`` (beyond the paper; also offered to the baseline): keep the KV cache of passage + prompt +
  output while the passage does not change, instead of recomputing the whole prefix every stride.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from rasd.ralmspec.retrievers import Retriever
from rasd.verify import with_cache


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
    generated tokens thrown away; chosen_strides: s of every speculation round; times in seconds."""

    strides: int = 0
    kb_calls: int = 0
    kb_queries: int = 0
    hits: int = 0
    misses: int = 0
    rollback_tokens: int = 0
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


class OS3Scheduler:
    """The OS³ stride scheduler.

    a: seconds of one speculation step (cache lookup + stride), b: seconds of one batched verification,
    γ: probability that a speculated passage is right, estimated as ΣM / (ΣM + rounds with a miss) over the
    last ``window`` rounds (M = matched speculations per round) and capped at ``gamma_cap``. The expected
    verified strides per second of a round of s speculations:

        sync:  (1 - γ^s) / ((1 - γ)(s·a + b))
        async: (1 - γ^s) / ((1 - γ)[γ^s((s - 1)a + max(a, b)) + (1 - γ^s)(s·a + b)])

    s grows from 1 while the next value is at least as good (both objectives are unimodal in s).
    """

    def __init__(
        self,
        *,
        async_verify: bool = False,
        window: int = 5,
        gamma_cap: float = 0.6,
        max_stride: int = 16,
        initial: int = 1,
    ) -> None:
        self.async_verify = async_verify
        self.gamma_cap = gamma_cap
        self.max_stride = max_stride
        self.rounds: collections.deque[tuple[int, bool]] = collections.deque(maxlen=window)
        self.a: float | None = None
        self.b: float | None = None
        self.current = initial

    @property
    def gamma(self) -> float:
        matched = sum(m for m, _ in self.rounds)
        missed = sum(1 for _, miss in self.rounds if miss)
        if matched + missed == 0:
            return 0.0
        return min(self.gamma_cap, matched / (matched + missed))

    @staticmethod
    def objective(s: int, a: float, b: float, gamma: float, async_verify: bool = False) -> float:
        gs = gamma**s
        gain = (1 - gs) / (1 - gamma) if gamma < 1 else float(s)
        if async_verify:
            return gain / (gs * ((s - 1) * a + max(a, b)) + (1 - gs) * (s * a + b))
        return gain / (s * a + b)

    @classmethod
    def optimal_stride(
        cls, a: float, b: float, gamma: float, async_verify: bool = False, max_stride: int = 16
    ) -> int:
        s = 1
        while s < max_stride and cls.objective(s + 1, a, b, gamma, async_verify) >= cls.objective(
            s, a, b, gamma, async_verify
        ):
            s += 1
        return s

    def update(self, a: float, b: float, matched: int, missed: bool) -> None:
        self.a, self.b = a, b
        self.rounds.append((matched, missed))
        self.current = self.optimal_stride(a, b, self.gamma, self.async_verify, self.max_stride)

    def stride(self) -> int:
        return self.current


class _FixedStride:
    """A constant stride with the scheduler's interface (``update`` learns nothing)."""

    def __init__(self, s: int) -> None:
        self.s = s

    def stride(self) -> int:
        return self.s

    def update(self, a: float, b: float, matched: int, missed: bool) -> None:
        pass


def stride_policy(
    scheduler: str | int, *, async_verify: bool = False, max_stride: int | None = None
) -> OS3Scheduler | _FixedStride:
    """A fresh per-request stride policy for the ``scheduler`` option: ``"os3"`` or a fixed stride count
    >= 1. With ``max_stride`` no stride exceeds it, fixed or chosen by OS³. Raises ValueError naming the
    accepted values."""
    if scheduler == "os3":
        return OS3Scheduler(
            async_verify=async_verify, **({} if max_stride is None else {"max_stride": max_stride})
        )
    if isinstance(scheduler, int) and scheduler >= 1 and (max_stride is None or scheduler <= max_stride):
        return _FixedStride(scheduler)
    bound = ">= 1" if max_stride is None else f"in [1, {max_stride}]"
    raise ValueError(f"scheduler must be 'os3' or a stride count {bound}, got {scheduler!r}")


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


@dataclass
class _Pending:
    query: str
    doc: int
    start: int  # len(generated) before the stride
    state: _State | None  # LM state before the stride


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
    ) -> None:
        if prefetch < 1:
            raise ValueError(f"prefetch must be >= 1 (1 = no prefetching), got {prefetch}")
        stride_policy(scheduler)  # validates the option
        self.config = config or RaLMConfig()
        self.retriever = retriever
        self.prefetch = prefetch
        self.scheduler = scheduler
        self.async_verify = async_verify
        self.lm = _StrideLM(model, tokenizer, self.config, retriever)
        self._pool = ThreadPoolExecutor(max_workers=1) if async_verify else None

    def _prepare_queries(self, queries: list[str]) -> None:
        """Embed queries on the calling thread (the worker then only searches: HF tokenizers are not safe to
        call from two threads at once)."""
        encoder = getattr(self.retriever, "encoder", None)
        if encoder is not None:
            encoder.encode_queries(queries)

    def generate(self, prompt: list[int]) -> RaLMOutput:
        if not prompt:
            raise ValueError("the prompt is empty")
        cfg, lm, stats = self.config, self.lm, RaLMStats()
        limit = cfg.max_new_tokens
        sched = stride_policy(self.scheduler, async_verify=self.async_verify)
        start = time.perf_counter()
        cache = _LocalCache(self.retriever)
        generated: list[int] = []
        docs: list[int] = []
        state: _State | None = None

        def speculate() -> _Pending:
            nonlocal state, generated
            t0 = time.perf_counter()
            q = lm.query(prompt + generated)
            doc = cache.top1(q)
            t1 = time.perf_counter()
            entry = _Pending(q, doc, len(generated), state)
            new, state = lm.stride(doc, state, prompt, generated, min(cfg.stride, limit - len(generated)))
            generated = generated + new
            stats.time_cache += t1 - t0
            stats.time_generation += time.perf_counter() - t1
            return entry

        def verified_stride(doc: int) -> None:
            """A stride with a passage the knowledge base returned (kept, never rolled back)."""
            nonlocal state, generated
            t1 = time.perf_counter()
            new, state = lm.stride(doc, state, prompt, generated, min(cfg.stride, limit - len(generated)))
            stats.time_generation += time.perf_counter() - t1
            generated = generated + new
            docs.append(doc)
            stats.strides += 1

        def kb(queries: list[str]) -> np.ndarray:
            ids, _ = self.retriever.search(queries, self.prefetch)
            return ids

        # The first stride: a plain (verified) knowledge-base call; its top-P seed the cache.
        if not _done(generated, lm, limit):
            t0 = time.perf_counter()
            ids = kb([lm.query(prompt)])
            stats.time_retrieval += time.perf_counter() - t0
            stats.kb_calls += 1
            stats.kb_queries += 1
            cache.add(ids)
            verified_stride(int(ids[0, 0]))

        carried: list[_Pending] = []  # speculated during the last async verification, not yet verified
        while not _done(generated, lm, limit) or carried:
            s = sched.stride()
            stats.chosen_strides.append(s)
            pending = carried
            carried = []
            t_spec = time.perf_counter()
            while len(pending) < s and not _done(generated, lm, limit):
                pending.append(speculate())
            a = (time.perf_counter() - t_spec) / max(1, len(pending))
            queries = [p.query for p in pending]
            t_ver = time.perf_counter()
            if self._pool is not None and not _done(generated, lm, limit):
                self._prepare_queries(queries)
                future = self._pool.submit(kb, queries)
                extra = speculate()  # overlaps the knowledge-base call
                ids = future.result()
                carried = [extra]
            else:
                ids = kb(queries)
            b = time.perf_counter() - t_ver
            stats.time_retrieval += b
            stats.kb_calls += 1
            stats.kb_queries += len(queries)
            cache.add(ids)
            truth = ids[:, 0].tolist()
            miss = next((i for i, p in enumerate(pending) if p.doc != truth[i]), None)
            matched = len(pending) if miss is None else miss
            stats.hits += matched
            kept = pending if miss is None else pending[:miss]
            docs += [p.doc for p in kept]
            stats.strides += len(kept)
            if miss is not None:
                stats.misses += 1
                bad = pending[miss]
                stats.rollback_tokens += len(generated) - bad.start
                generated = generated[: bad.start]
                state = bad.state
                carried = []
                verified_stride(truth[miss])
            sched.update(a, b, matched, miss is not None)
        stats.time_total = time.perf_counter() - start
        return RaLMOutput(generated, docs, stats)
