"""The speculate / batch-verify / roll-back loop shared by RaLMSpec and speculative KNN-LM; stride policies.

A speculative retrieval task (:class:`Speculation`) decodes in *steps* (RaLM: a stride of k tokens with one
passage; KNN-LM: one token from its neighbours). Each step needs a knowledge-base answer for the current
context; a local cache can *guess* it. :func:`speculate` runs the loop of RaLMSpec (Zhang et al., ICML 2024):

1. the first step asks the knowledge base (the answer seeds the cache);
2. a round guesses and commits s steps from the cache (s from the stride policy), then verifies the s
   queries in one batched knowledge-base call (with ``pool``, and where the policy finds that overlapping
   pays: in a worker thread while one more step is guessed);
3. the steps whose guess equals the knowledge base's answer are kept; at the first mismatch the later steps
   are rolled back and that step is redone with the true answer.

Every kept step therefore used exactly the baseline's answer, so greedy output equals the baseline's.
The stride policy (:class:`OS3Scheduler` or a fixed stride) learns from the timings the loop measures.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import numpy as np

C = TypeVar("C")  # a step's context: what the knowledge base is asked about, and what answers are read from
V = TypeVar("V")  # what a step commits: a passage id (RaLM) or a token (KNN-LM)
M = TypeVar("M")  # what a task needs to roll a step back (the state before it)

# The cap on OS³'s estimate of γ. The paper's 0.6 was set for passage guesses without prefetching; with
# prefetching, passage guesses were right 94-100 % of the time at 44,022 passages, and KNN-LM token guesses
# 92-94 % (94k entries) to 97-98 % (1M): under 0.6 a round always expects a miss in 40 % of guesses and OS³
# chose plain steps where fixed strides paid (Milvus FLAT: +prefetch 1.13x, +os3 0.99x).
GAMMA_CAP = 0.98


def _check_gamma_cap(gamma_cap: float) -> None:
    if not 0.0 < gamma_cap <= 1.0:
        raise ValueError(
            f"gamma_cap must be in (0, 1] (a probability that a guess is right), got {gamma_cap}"
        )


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
    overlapped_rounds: int
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

    pool: a one-worker executor for asynchronous verification, or None (verify on the calling thread); a
    round overlaps its verification with a guess only where ``policy.overlap()`` says so.
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
        overlapped = pool is not None and policy.overlap() and not task.done()
        if overlapped:
            stats.overlapped_rounds += 1
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
        policy.update(
            a, b, matched, miss is not None, stride=len(pending), commit=per_commit, overlapped=overlapped
        )
    return values


class OS3Scheduler:
    """The OS³ stride scheduler, with the choice of not speculating.

    c: seconds of one cache guess, g: seconds of one commit (the LM's work for a step; a speculation step
    costs a = c + g), both smoothed over the recent rounds (exponential average, weight ``smoothing`` on
    the newest), so that the noise of one LM forward does not flip the choice; b(s): seconds of a batched
    verification of s queries, fitted as b0 + b1·s to the last 16 verifications of one query (plain steps
    are such) together with the last 16 of batches (kept apart, so that the slope is not forgotten while
    plain); γ: probability that a guess is right, the share of right guesses among the
    last ``window`` verified guesses (a round of M right guesses and a miss is M + 1 verified guesses, the
    guesses after a miss are unverified; a plain step's shadow guess is one) plus ``prior_trials`` guesses
    right at the rate ``gamma_cap`` (a Beta prior: one early miss from a still tiny cache must not read as
    γ = 0 and switch speculation off for the request), capped at ``gamma_cap``.
    Expected kept steps per second of a round of s guesses (the correction after a miss costs one more
    commit):

        sync:  E(s) / (s·a + b(s) + (1 - γ^s)·g),   E(s) = (1 - γ^s) / (1 - γ)
        async: E(s) / ((s - 1)·a + w(s) + (1 - γ^s)(g + a))

    (with g = 0 and b constant, the sync one is the paper's objective), and of a plain step, 1 / (b(1) + g).
    Async: a round guesses s - 1 steps, then overlaps the verification with one more guess, w(s) seconds of
    wall time for the two together; that guess is carried into the next round, or thrown away on a miss (the
    next round guesses it again: + a). w(s) is fitted to the measured overlapped verifications like b(s);
    before any, it is max(a, b(s)), the ideal overlap. Measured matters: where the worker and the LM compete
    for the cores (2 here) the two together take longer than one after the other, and the measured w
    steers the scheduler back to synchronous rounds (``async_verify`` allows overlapping, it does not
    force it). The stride is the s in [1, max_stride] with the best rate over both modes, or 0 (no
    speculation: plain steps, the baseline's loop) when plain steps are at least as fast (``allow_plain``).
    Leaving plain steps takes an expected gain of ``margin`` (a hysteresis: near break-even, estimates that
    flip with noise would otherwise alternate the two, and every wrong round pays a rollback). 8 %, not 3 %:
    a shadow guess is made from the freshest cache, so it overestimates the guesses deep in a round (KNN-LM
    over IVF at 1M entries: rounds predicted 4-6 % faster than plain steps lost, ivf_os3 0.969x at 3 %,
    0.978x at 8 %, 0.983x never leaving plain). While plain,
    every ``shadow_every``-th step guesses first (a cache lookup, no model work) so that γ follows the
    request and speculation resumes when it would pay. The batch times are forgotten after
    ``forget_batches`` plain steps in a row (b(s) is then b(1) at every s until a round measures it again),
    so that one slow batch (a cold page cache, a busy machine) cannot keep a process plain for good; the
    probe round this allows costs little at that spacing.
    Before any measurement the stride is ``initial``.
    """

    def __init__(
        self,
        *,
        async_verify: bool = False,
        window: int = 32,
        gamma_cap: float = GAMMA_CAP,
        max_stride: int = 16,
        initial: int = 2,
        allow_plain: bool = True,
        shadow_every: int = 4,
        forget_batches: int = 64,
        margin: float = 0.08,
        smoothing: float = 0.25,
        prior_trials: float = 4.0,
    ) -> None:
        if not 1 <= initial <= max_stride:
            raise ValueError(f"initial must be in [1, max_stride={max_stride}], got {initial}")
        if window < 1:
            raise ValueError(f"window must be >= 1 verified guesses, got {window}")
        if prior_trials < 0:
            raise ValueError(f"prior_trials must be >= 0, got {prior_trials}")
        if not 0.0 < smoothing <= 1.0:
            raise ValueError(f"smoothing must be in (0, 1], got {smoothing}")
        _check_gamma_cap(gamma_cap)
        self.async_verify = async_verify
        self.gamma_cap = gamma_cap
        self.max_stride = max_stride
        self.allow_plain = allow_plain
        self.shadow_every = shadow_every
        self.forget_batches = forget_batches
        self.margin = margin
        self.smoothing = smoothing
        self.prior_trials = prior_trials
        self.trials: collections.deque[bool] = collections.deque(maxlen=window)  # verified guesses
        # (s, seconds) of recent verifications: of one query (plain steps and rounds of one guess), and of
        # batches apart, so that a run of plain steps cannot push the batch sizes out of the fit (it then
        # fell back to "b(s) = b(1) at every s", rounds looked nearly free, and one was taken, and rolled
        # back, after every 16 plain steps: KNN-LM over IVF at 1M entries, ivf_os3 0.965x -> see the note)
        self.verifications: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)
        self.batched: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)
        self.overlaps: collections.deque[tuple[int, float]] = collections.deque(maxlen=16)  # (s, w) async
        self.overlapping = async_verify  # whether the current stride's rounds overlap (never without async)
        self.c: float | None = None
        self.g: float | None = None
        self.current = initial
        self._plain = 0
        self._plain_run = 0  # plain steps since the last batched verification

    @property
    def gamma(self) -> float:
        n = len(self.trials) + self.prior_trials
        if n == 0:
            return 0.0
        return min(self.gamma_cap, (sum(self.trials) + self.prior_trials * self.gamma_cap) / n)

    @property
    def a(self) -> float | None:
        """Seconds of one speculation step (guess + commit); None before any round."""
        return None if self.c is None else self.c + (self.g or 0.0)

    def _smooth(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def _fit(self, points: Sequence[tuple[int, float]] | None = None) -> tuple[float, float]:
        """(b0, b1) of b(s) = b0 + b1·s: least squares with b0, b1 >= 0 over the recent verifications, of
        one query and of batches (or
        ``points``: (s, seconds) pairs); with one batch size seen so far, its mean at every s (the paper's
        assumption)."""
        if points is None:
            points = [*self.verifications, *self.batched]
        pts = np.array(points, dtype=np.float64).reshape(-1, 2)
        sizes, costs = pts[:, 0], pts[:, 1]
        if len(np.unique(sizes)) < 2:
            return float(costs.mean()), 0.0
        slope = max(float(np.cov(sizes, costs, bias=True)[0, 1] / sizes.var()), 0.0)
        return max(float(costs.mean() - slope * sizes.mean()), 0.0), slope

    def verify_cost(self, s: int) -> float:
        """b(s), fitted to the recent verifications (see :meth:`_fit`)."""
        b0, b1 = self._fit()
        return b0 + b1 * s

    def _overlap_seconds(self, s: np.ndarray, b: np.ndarray) -> np.ndarray:
        """w(s): wall seconds of an overlapped verification of s queries with one guess beside it, fitted
        to the measured ones; before any, the ideal max(a, b(s)) (``b``: b(s), already fitted)."""
        if self.overlaps:
            w0, w1 = self._fit(self.overlaps)
            return w0 + w1 * s
        return np.maximum(self.a or 0.0, b)

    def rates(self, overlapped: bool | None = None) -> np.ndarray:
        """Expected kept steps per second for every stride s in [0, max_stride] (index s; 0: plain steps),
        with rounds that overlap their verification (async) or not; None: the mode of the current choice."""
        overlapped = self.overlapping if overlapped is None else overlapped
        b0, b1 = self._fit()
        a, g, gamma = self.a or 0.0, self.g or 0.0, self.gamma
        s = np.arange(self.max_stride + 1, dtype=np.float64)
        b = b0 + b1 * s
        gs = gamma**s
        gain = (1 - gs) / (1 - gamma) if gamma < 1 else s
        if overlapped:
            time_ = (s - 1) * a + self._overlap_seconds(s, b) + (1 - gs) * (g + a)
        else:
            time_ = s * a + b + (1 - gs) * g
        out = gain / np.maximum(time_, 1e-12)
        out[0] = 1.0 / max(b0 + b1 + g, 1e-12)
        return out

    def rate(self, s: int, overlapped: bool | None = None) -> float:
        """Expected kept steps per second with stride s (0: plain steps); ``overlapped`` as in
        :meth:`rates`."""
        return float(self.rates(overlapped)[s])

    def _choose(self) -> None:
        modes = (False, True) if self.async_verify else (False,)
        rates = {mode: self.rates(mode) for mode in modes}
        mode = max(modes, key=lambda m: rates[m][1:].max())
        best = int(np.argmax(rates[mode][1:])) + 1
        self.overlapping = mode
        if not self.allow_plain:
            self.current = best
            return
        plain = rates[mode][0]
        need = plain * (1.0 + self.margin) if self.current == 0 else plain
        self.current = best if rates[mode][best] > need else 0

    def update(
        self,
        a: float | None,
        b: float,
        matched: int,
        missed: bool,
        *,
        stride: int | None = None,
        commit: float | None = None,
        overlapped: bool = False,
    ) -> None:
        """After a speculative round: ``a`` seconds per guessed step (None: the round guessed nothing new),
        ``b`` seconds of the verification of ``stride`` queries (default: the current stride; with
        ``overlapped``, the wall seconds of the verification and the guess beside it, w), ``commit``
        seconds of one commit alone (None: the guess cost is taken as 0 and a as the commit), ``matched``
        guesses right before the first miss (if ``missed``)."""
        if a is not None:
            g = a if commit is None else commit
            self.g = self._smooth(self.g, g)
            self.c = self._smooth(self.c, max(a - g, 0.0))
        size = stride or max(self.current, 1)
        (self.overlaps if overlapped else self.verifications if size == 1 else self.batched).append((size, b))
        if size > 1:
            self._plain_run = 0
        self.trials.extend([True] * matched + [False] * missed)
        self._choose()

    def update_plain(self, b: float, commit: float, hit: bool | None) -> None:
        """After a plain step: ``b`` seconds of its one-query search, ``commit`` seconds of its commit,
        ``hit`` whether its shadow guess was right (None: no shadow guess)."""
        self.g = self._smooth(self.g, commit)
        self.verifications.append((1, b))
        self._plain_run += 1
        forgot = self._plain_run >= self.forget_batches
        if forgot:
            self.batched.clear()
            self._plain_run = 0
        if hit is not None:
            self.trials.append(hit)
        # Plain steps before any round (the first step) leave the initial stride. While plain, only a shadow
        # guess (γ) or forgotten batch times can change the choice much: b(1) and g move slowly, and
        # re-choosing after every step cost 0.25 ms, 0.5 % of a KNN-LM step over IVF at 1M entries.
        if self.c is not None and (self.current != 0 or hit is not None or forgot):
            self._choose()

    def warm_start(self, previous: OS3Scheduler) -> None:
        """Start from what ``previous`` (the last request of the same model, knowledge base and machine)
        measured: the costs c, g, the verification times (overlapped ones too), the verified guesses
        (windowed, so this request's own guesses soon replace them) and whether it was taking plain steps.
        Without it every request starts cold, and one early miss among a handful of guesses keeps the
        strides short for much of a 48-token answer. (Carrying only the last request's γ as a prior of
        ``prior_trials`` guesses was tried: over KNN-LM at 94k entries, where γ differs a lot from question
        to question, it was no better, +os3 0.959x vs 0.966x, and one early miss then stops speculation
        where it pays most, e.g. Milvus FLAT, whose rounds need γ above 0.8.)"""
        self.c, self.g = previous.c, previous.g
        self.verifications.extend(previous.verifications)
        self.batched.extend(previous.batched)
        self._plain_run = previous._plain_run
        self.overlaps.extend(previous.overlaps)
        self.trials.extend(previous.trials)
        # Inherit plain-or-speculating too: a request after plain steps must clear the margin to speculate,
        # as the previous one had to (else a rate barely above plain's opens every request with rounds).
        self.current = previous.current
        if self.c is not None:
            self._choose()

    def shadow(self) -> bool:
        """Whether the next plain step should guess first."""
        self._plain += 1
        return self._plain % self.shadow_every == 0

    def overlap(self) -> bool:
        """Whether the next round should overlap its verification with a guess (async)."""
        return self.overlapping

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

    def overlap(self) -> bool:
        return True  # a fixed stride measures nothing: with a worker pool it always overlaps


def stride_policy(
    scheduler: str | int,
    *,
    async_verify: bool = False,
    max_stride: int | None = None,
    gamma_cap: float = GAMMA_CAP,
    previous: OS3Scheduler | FixedStride | None = None,
) -> OS3Scheduler | FixedStride:
    """A per-request stride policy for the ``scheduler`` option: ``"os3"`` or a fixed stride count >= 1.
    With ``max_stride`` no stride exceeds it, fixed or chosen by OS³ (whose γ estimate is capped at
    ``gamma_cap``); an OS³ policy starts from the measurements of ``previous`` (the last request's policy,
    see :meth:`OS3Scheduler.warm_start`). Raises ValueError naming the accepted values."""
    # Also for a fixed stride: RaLMSpec and SpeculativeKNNLM validate through here.
    _check_gamma_cap(gamma_cap)
    if scheduler == "os3":
        bound = {} if max_stride is None else {"max_stride": max_stride}
        policy = OS3Scheduler(async_verify=async_verify, gamma_cap=gamma_cap, **bound)
        if isinstance(previous, OS3Scheduler):
            policy.warm_start(previous)
        return policy
    if isinstance(scheduler, int) and scheduler >= 1 and (max_stride is None or scheduler <= max_stride):
        return FixedStride(scheduler)
    bound = ">= 1" if max_stride is None else f"in [1, {max_stride}]"
    raise ValueError(f"scheduler must be 'os3' or a stride count {bound}, got {scheduler!r}")
