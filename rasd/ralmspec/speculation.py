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

import numpy as np

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
    plain_steps: int
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
    A stride of 0 from the policy is a *plain* step, exactly the baseline's: one knowledge-base call, then
    the step (the policy may ask for a shadow guess first, which keeps its estimate of γ current).
    """
    values: list[V] = []
    commit_time = [0.0]  # seconds of the last commit

    def commit(context: C, value: V) -> _Step[C, V, M]:
        t0 = time.perf_counter()
        mark = task.commit(value)
        commit_time[0] = time.perf_counter() - t0
        stats.time_generation += commit_time[0]
        values.append(value)
        return _Step(context, value, mark, len(values) - 1)

    def guessed_step() -> _Step[C, V, M]:
        context = task.context()
        t0 = time.perf_counter()
        value = task.guess(context)
        stats.time_cache += time.perf_counter() - t0
        return commit(context, value)

    def plain_step(shadow: bool) -> None:
        """One verified step; the knowledge base's answer also seeds the cache."""
        context = task.context()
        guess: V | None = None
        if shadow:
            t0 = time.perf_counter()
            guess = task.guess(context)
            stats.time_cache += time.perf_counter() - t0
        t0 = time.perf_counter()
        result = task.search([task.query(context)])
        b = time.perf_counter() - t0
        stats.time_retrieval += b
        stats.kb_calls += 1
        stats.kb_queries += 1
        task.learn(result)
        t0 = time.perf_counter()
        value = task.answer(context, result[0])
        stats.time_generation += time.perf_counter() - t0
        commit(context, value)
        stats.strides += 1
        stats.plain_steps += 1
        policy.update_plain(b, commit_time[0], None if guess is None else guess == value)

    if not task.done():
        plain_step(shadow=False)  # the first step: its answer seeds the cache

    carried: list[_Step[C, V, M]] = []  # guessed during the last async verification, not yet verified
    while not task.done() or carried:
        s = policy.stride()
        stats.chosen_strides.append(s)
        if s == 0 and not carried:
            plain_step(policy.shadow())
            continue
        s = max(s, 1)
        pending, carried = carried, []
        commits, guessed = 0.0, 0
        t_spec = time.perf_counter()
        while len(pending) < s and not task.done():
            pending.append(guessed_step())
            commits += commit_time[0]
            guessed += 1
        a = (time.perf_counter() - t_spec) / guessed if guessed else None
        queries = [task.query(p.context) for p in pending]
        t_ver = time.perf_counter()
        if pool is not None and not task.done():
            task.prepare(queries)
            future = pool.submit(task.search, queries)
            carried = [guessed_step()]  # overlaps the knowledge-base call
            result = future.result()
        else:
            result = task.search(queries)
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
        per_commit = commits / guessed if guessed else None
        policy.update(a, b, matched, miss is not None, stride=len(pending), commit=per_commit)
    return values


class OS3Scheduler:
    """The OS³ stride scheduler, with the choice of not speculating.

    a: seconds of one speculation step (cache guess + commit), g: seconds of one commit alone, b(s): seconds
    of a batched verification of s queries, fitted as b0 + b1·s to the recent verifications (plain steps
    are verifications of one query), γ: probability that a guess is right, ΣM / (ΣM + rounds with a miss)
    over the last ``window`` rounds (M = matched guesses per round; a plain step's shadow guess counts as a
    round of one), capped at ``gamma_cap``. Expected kept steps per second of a round of s guesses (the
    correction after a miss costs one more commit):

        sync:  E(s) / (s·a + b(s) + (1 - γ^s)·g),   E(s) = (1 - γ^s) / (1 - γ)
        async: E(s) / (γ^s((s - 1)a + max(a, b(s))) + (1 - γ^s)(s·a + b(s) + g))

    and of a plain step, 1 / (b(1) + g). The stride is the s in [1, max_stride] with the best rate, or 0 (no
    speculation: plain steps, the baseline's loop) when plain steps are at least as fast (``allow_plain``).
    While plain, every ``shadow_every``-th step guesses first (a cache lookup, no model work) so that γ
    follows the request and speculation resumes when it would pay. Before any measurement the stride is
    ``initial``.
    """

    def __init__(
        self,
        *,
        async_verify: bool = False,
        window: int = 5,
        gamma_cap: float = 0.6,
        max_stride: int = 16,
        initial: int = 2,
        allow_plain: bool = True,
        shadow_every: int = 4,
    ) -> None:
        if not 1 <= initial <= max_stride:
            raise ValueError(f"initial must be in [1, max_stride={max_stride}], got {initial}")
        self.async_verify = async_verify
        self.gamma_cap = gamma_cap
        self.max_stride = max_stride
        self.allow_plain = allow_plain
        self.shadow_every = shadow_every
        self.rounds: collections.deque[tuple[int, bool]] = collections.deque(maxlen=window)
        self.verifications: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)
        self.a: float | None = None
        self.g: float | None = None
        self.current = initial
        self._plain = 0

    @property
    def gamma(self) -> float:
        matched = sum(m for m, _ in self.rounds)
        missed = sum(1 for _, miss in self.rounds if miss)
        if matched + missed == 0:
            return 0.0
        return min(self.gamma_cap, matched / (matched + missed))

    @staticmethod
    def objective(s: int, a: float, b: float, gamma: float, async_verify: bool = False) -> float:
        """The paper's expected strides per second of a round of s (b independent of s, no correction)."""
        gs = gamma**s
        gain = (1 - gs) / (1 - gamma) if gamma < 1 else float(s)
        if async_verify:
            return gain / (gs * ((s - 1) * a + max(a, b)) + (1 - gs) * (s * a + b))
        return gain / (s * a + b)

    @classmethod
    def optimal_stride(
        cls, a: float, b: float, gamma: float, async_verify: bool = False, max_stride: int = 16
    ) -> int:
        """The paper's rule: s grows from 1 while :meth:`objective` of s + 1 is at least as good."""
        s = 1
        while s < max_stride and cls.objective(s + 1, a, b, gamma, async_verify) >= cls.objective(
            s, a, b, gamma, async_verify
        ):
            s += 1
        return s

    def verify_cost(self, s: int) -> float:
        """b(s): least squares b0 + b1·s (b0, b1 >= 0) over the recent verifications; with one batch size
        seen so far, its mean at every s (the paper's assumption)."""
        pts = np.array(self.verifications, dtype=np.float64).reshape(-1, 2)
        sizes, costs = pts[:, 0], pts[:, 1]
        if len(np.unique(sizes)) < 2:
            return float(costs.mean())
        slope = float(np.cov(sizes, costs, bias=True)[0, 1] / sizes.var())
        slope = max(slope, 0.0)
        base = max(float(costs.mean() - slope * sizes.mean()), 0.0)
        return base + slope * s

    def rate(self, s: int) -> float:
        """Expected kept steps per second with stride s (0: plain steps)."""
        a, g, gamma = self.a or 0.0, self.g or 0.0, self.gamma
        if s == 0:
            return 1.0 / max(self.verify_cost(1) + g, 1e-12)
        b = self.verify_cost(s)
        gs = gamma**s
        gain = (1 - gs) / (1 - gamma) if gamma < 1 else float(s)
        if self.async_verify:
            time_ = gs * ((s - 1) * a + max(a, b)) + (1 - gs) * (s * a + b + g)
        else:
            time_ = s * a + b + (1 - gs) * g
        return gain / max(time_, 1e-12)

    def _choose(self) -> None:
        best = max(range(1, self.max_stride + 1), key=self.rate)
        self.current = 0 if self.allow_plain and self.rate(0) >= self.rate(best) else best

    def update(
        self,
        a: float | None,
        b: float,
        matched: int,
        missed: bool,
        *,
        stride: int | None = None,
        commit: float | None = None,
    ) -> None:
        """After a speculative round: ``a`` seconds per guessed step (None: the round guessed nothing new,
        keep the last), ``b`` seconds of the verification of ``stride`` queries (default: the current
        stride), ``commit`` seconds of one commit alone (None: keep the last, or ``a``), ``matched`` guesses
        right before the first miss (if ``missed``)."""
        if a is not None:
            self.a = a
        if commit is not None:
            self.g = commit
        elif self.g is None:
            self.g = self.a
        self.verifications.append((stride or max(self.current, 1), b))
        self.rounds.append((matched, missed))
        self._choose()

    def update_plain(self, b: float, commit: float, hit: bool | None) -> None:
        """After a plain step: ``b`` seconds of its one-query search, ``commit`` seconds of its commit,
        ``hit`` whether its shadow guess was right (None: no shadow guess)."""
        self.g = commit
        self.verifications.append((1, b))
        if hit is not None:
            self.rounds.append((1, False) if hit else (0, True))
        if self.a is not None:  # plain steps before any round (the first step) leave the initial stride
            self._choose()

    def shadow(self) -> bool:
        """Whether the next plain step should guess first."""
        self._plain += 1
        return self._plain % self.shadow_every == 0

    def stride(self) -> int:
        return self.current


class FixedStride:
    """A constant stride with the scheduler's interface (learns nothing)."""

    def __init__(self, s: int) -> None:
        self.s = s

    def stride(self) -> int:
        return self.s

    def update(self, a: float | None, b: float, matched: int, missed: bool, **_: Any) -> None:
        pass

    def update_plain(self, b: float, commit: float, hit: bool | None) -> None:
        pass

    def shadow(self) -> bool:
        return False


def stride_policy(
    scheduler: str | int,
    *,
    async_verify: bool = False,
    max_stride: int | None = None,
    gamma_cap: float = 0.6,
) -> OS3Scheduler | FixedStride:
    """A fresh per-request stride policy for the ``scheduler`` option: ``"os3"`` or a fixed stride count
    >= 1. With ``max_stride`` no stride exceeds it, fixed or chosen by OS³ (whose γ estimate is capped at
    ``gamma_cap``). Raises ValueError naming the accepted values."""
    if scheduler == "os3":
        bound = {} if max_stride is None else {"max_stride": max_stride}
        return OS3Scheduler(async_verify=async_verify, gamma_cap=gamma_cap, **bound)
    if isinstance(scheduler, int) and scheduler >= 1 and (max_stride is None or scheduler <= max_stride):
        return FixedStride(scheduler)
    bound = ">= 1" if max_stride is None else f"in [1, {max_stride}]"
    raise ValueError(f"scheduler must be 'os3' or a stride count {bound}, got {scheduler!r}")
