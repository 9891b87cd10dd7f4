"""The speculate / batch-verify / roll-back loop shared by RaLMSpec and speculative KNN-LM; stride policies.

A speculative retrieval task (:class:`Speculation`) decodes in *steps* (RaLM: a stride of k tokens with one
passage; KNN-LM: one token from its neighbours). Each step needs a knowledge-base answer for the current
context; a local cache can *guess* it. :func:`speculate` runs the loop of RaLMSpec (Zhang et al., ICML 2024):

1. the first step asks the knowledge base (the answer seeds the cache);
2. a round guesses and commits s steps from the cache (s from the stride policy), then verifies the s
   queries in one batched knowledge-base call (with ``pool``: in a worker thread while one more step is
   guessed);
3. the steps whose guess equals the knowledge base's answer are kept; at the first mismatch the later steps
   are rolled back and that step is redone with the true answer.

Every kept step therefore used exactly the baseline's answer, so greedy output equals the baseline's.
The stride policy (:class:`OS3Scheduler` or a fixed stride) learns from the timings the loop measures.
"""

from __future__ import annotations

import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

C = TypeVar("C")  # a step's context: what the knowledge base is asked about, and what answers are read from
V = TypeVar("V")  # what a step commits: a passage id (RaLM) or a token (KNN-LM)
M = TypeVar("M")  # what a task needs to roll a step back (the state before it)


class Speculation(Protocol[C, V, M]):
    """One request of a speculative retrieval task; the loop (:func:`speculate`) calls only these."""

    def done(self) -> bool:
        """Generation has ended (token limit or end of sequence)."""

    def context(self) -> C:
        """The current step's context (taken before the step commits)."""

    def query(self, context: C) -> Any:
        """The knowledge-base query of ``context``."""

    def guess(self, context: C) -> V:
        """What the local cache says the knowledge base will answer for ``context``."""

    def answer(self, context: C, result: Any) -> V:
        """What the knowledge base's ``result`` for ``context`` (one row of :meth:`search`) means."""

    def commit(self, value: V) -> M:
        """Take one step with ``value``; returns what :meth:`rollback` needs to undo it."""

    def rollback(self, mark: M) -> int:
        """Undo every step from the one that returned ``mark`` on; returns the generated tokens discarded."""

    def search(self, queries: list[Any]) -> Any:
        """One batched knowledge-base call; row i answers ``queries[i]``. May run in a worker thread."""

    def prepare(self, queries: list[Any]) -> None:
        """Main-thread work :meth:`search` needs before it runs in a worker thread (query embedding)."""

    def learn(self, result: Any) -> None:
        """Add a knowledge-base result to the local cache."""


@dataclass(eq=False)
class _Step(Generic[C, V, M]):
    context: C
    value: V
    mark: M
    index: int  # position in the committed values


class _Stats(Protocol):
    strides: int
    kb_calls: int
    kb_queries: int
    hits: int
    misses: int
    rollback_tokens: int
    chosen_strides: list[int]
    time_generation: float
    time_retrieval: float
    time_cache: float


def speculate(
    task: Speculation[C, V, M],
    policy: OS3Scheduler | FixedStride,
    stats: _Stats,
    pool: ThreadPoolExecutor | None,
) -> list[V]:
    """Run ``task`` to its end; returns the value of every kept step in order (``stats`` is filled in).

    pool: a one-worker executor for asynchronous verification, or None (verify on the calling thread).
    """
    values: list[V] = []

    def commit(context: C, value: V) -> _Step[C, V, M]:
        t0 = time.perf_counter()
        mark = task.commit(value)
        stats.time_generation += time.perf_counter() - t0
        values.append(value)
        return _Step(context, value, mark, len(values) - 1)

    def guessed_step() -> _Step[C, V, M]:
        context = task.context()
        t0 = time.perf_counter()
        value = task.guess(context)
        stats.time_cache += time.perf_counter() - t0
        return commit(context, value)

    def search(queries: list[Any]) -> tuple[Any, float]:
        t0 = time.perf_counter()
        result = task.search(queries)
        return result, time.perf_counter() - t0

    # The first step: a plain (verified) knowledge-base call; its answer seeds the cache.
    if not task.done():
        context = task.context()
        result, b = search([task.query(context)])
        stats.time_retrieval += b
        stats.kb_calls += 1
        stats.kb_queries += 1
        task.learn(result)
        t0 = time.perf_counter()
        value = task.answer(context, result[0])
        stats.time_generation += time.perf_counter() - t0
        commit(context, value)
        stats.strides += 1

    carried: list[_Step[C, V, M]] = []  # guessed during the last async verification, not yet verified
    while not task.done() or carried:
        s = policy.stride()
        stats.chosen_strides.append(s)
        pending, carried = carried, []
        t_spec = time.perf_counter()
        while len(pending) < s and not task.done():
            pending.append(guessed_step())
        a = (time.perf_counter() - t_spec) / max(1, len(pending))
        queries = [task.query(p.context) for p in pending]
        t_ver = time.perf_counter()
        if pool is not None and not task.done():
            task.prepare(queries)
            future = pool.submit(task.search, queries)
            carried = [guessed_step()]  # overlaps the knowledge-base call
            result = future.result()
        else:
            result, _ = search(queries)
        b = time.perf_counter() - t_ver
        stats.time_retrieval += b
        stats.kb_calls += 1
        stats.kb_queries += len(pending)
        task.learn(result)
        t0 = time.perf_counter()
        miss: tuple[int, V] | None = None
        for i, step in enumerate(pending):
            truth = task.answer(step.context, result[i])
            if truth != step.value:
                miss = (i, truth)
                break
        matched = len(pending) if miss is None else miss[0]
        stats.hits += matched
        stats.strides += matched
        if miss is not None:
            bad = pending[miss[0]]
            stats.misses += 1
            stats.rollback_tokens += task.rollback(bad.mark)
            del values[bad.index :]
            carried = []
            stats.time_generation += time.perf_counter() - t0
            commit(bad.context, miss[1])
            stats.strides += 1
        else:
            stats.time_generation += time.perf_counter() - t0
        policy.update(a, b, matched, miss is not None)
    return values


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


class FixedStride:
    """A constant stride with the scheduler's interface (``update`` learns nothing)."""

    def __init__(self, s: int) -> None:
        self.s = s

    def stride(self) -> int:
        return self.s

    def update(self, a: float, b: float, matched: int, missed: bool) -> None:
        pass


def stride_policy(
    scheduler: str | int, *, async_verify: bool = False, max_stride: int | None = None
) -> OS3Scheduler | FixedStride:
    """A fresh per-request stride policy for the ``scheduler`` option: ``"os3"`` or a fixed stride count
    >= 1. With ``max_stride`` no stride exceeds it, fixed or chosen by OS³. Raises ValueError naming the
    accepted values."""
    if scheduler == "os3":
        return OS3Scheduler(
            async_verify=async_verify, **({} if max_stride is None else {"max_stride": max_stride})
        )
    if isinstance(scheduler, int) and scheduler >= 1 and (max_stride is None or scheduler <= max_stride):
        return FixedStride(scheduler)
    bound = ">= 1" if max_stride is None else f"in [1, {max_stride}]"
    raise ValueError(f"scheduler must be 'os3' or a stride count {bound}, got {scheduler!r}")
