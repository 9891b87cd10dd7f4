"""The budget planner: how big a tree pays for itself, decided from measured costs, not hand-set thresholds.

Two models, both learned on the machine at hand:

- **cost**: the target's verification time T(n) for n fed tokens (:func:`rasd.costmodel.profile_verify`,
  corrected online by the ratio of measured to predicted step times), and the draft model's time per
  expansion forward (running mean).
- **acceptance**: :class:`AcceptanceModel`, the probability that a node is accepted given that its parent
  was reached, per node kind (draft model; retrieval scored by the draft model; prompt lookup and corpus
  lookup, each by matched-suffix length 1-2 / 3-5 / 6+) and per bin of the node's feature (draft
  probability, or retrieval count ratio). It starts from
  the prior "probability = feature" and is updated after every step from what the verifier accepted.

A node's *path probability* is the product of the acceptance probabilities along its root path; the
expected tokens of a step with tree T are 1 + sum of path probabilities (the bonus token is free). The
planner keeps the prefix (in best-first order) of the tree that maximises expected tokens per second::

    rate(N) = (1 + sum_{i <= N} path_prob_i) / (seconds already spent drafting + T(N + 1))

and an expansion of the draft tree is only run while it raises that rate (:meth:`Planner.plan_expansion`).
With N = 0 a step costs one plain decode, so on any machine speculation is only chosen when it is expected
to pay.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from rasd.costmodel import CostCurve
from rasd.tree import Source, TokenTree, best_first_order, keep_first, path_products
from rasd.verify import Acceptance

_BINS = np.array([0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0 + 1e-9])
KINDS = (
    "draft",
    "fused",
    "prompt:1-2",
    "prompt:3-5",
    "prompt:6+",
    "corpus:1-2",
    "corpus:3-5",
    "corpus:6+",
    "recycle",
    "other",
)
_MATCH_BUCKETS = (3, 6)  # match lengths 1-2 / 3-5 / 6+: longer matches repeat more reliably


def node_kinds(tree: TokenTree) -> tuple[np.ndarray, np.ndarray]:
    """(kind index into KINDS [N], feature in [0, 1] [N]) of every node."""
    has_dp = ~np.isnan(tree.draft_probs)
    src = tree.sources.astype(np.int64)
    retrieval = (src & (Source.PROMPT | Source.CORPUS | Source.RECYCLE)) != 0
    kind = np.full(len(tree), KINDS.index("other"), dtype=np.int64)
    kind[(src & Source.RECYCLE) != 0] = KINDS.index("recycle")
    bucket = np.searchsorted(_MATCH_BUCKETS, tree.match_lengths, side="right")
    kind[(src & Source.CORPUS) != 0] = KINDS.index("corpus:1-2") + bucket[(src & Source.CORPUS) != 0]
    kind[(src & Source.PROMPT) != 0] = KINDS.index("prompt:1-2") + bucket[(src & Source.PROMPT) != 0]
    kind[has_dp & ~retrieval] = KINDS.index("draft")
    kind[has_dp & retrieval] = KINDS.index("fused")
    feature = np.where(has_dp, tree.draft_probs, np.clip(tree.scores, 0.0, 1.0)).astype(np.float64)
    return kind, np.clip(np.nan_to_num(feature, nan=0.0), 0.0, 1.0)


@dataclass
class AcceptanceModel:
    """P(accepted | parent reached) per (kind, feature bin), with a prior of ``prior_weight`` pseudo-tests
    at "probability = bin centre", learned over every request; and, within the current request, one factor
    per kind: (accepted + w) / (predicted + w) over this request's tested nodes of that kind, so a source
    that does badly on this prompt (corpus matches on a chat answer) loses budget to the others at once.
    ``request_weight`` (w) is in expected acceptances; :meth:`begin_request` resets the factors.

    Path probabilities are then calibrated per kind over every verified tree: the products of node
    estimates along retrieval chains came out 2-8x above what was accepted (Spec-Bench, Qwen pair: prompt
    matches of 3-5 tokens 21.7 predicted vs 8 accepted, corpus 1-2 7.9 vs 1) while the node estimates on
    tested nodes were right: each node of a chain is tested only once its parent was accepted, and
    per-request factors above 1 compound along the chain. So each kind's path probabilities are scaled by
    (accepted + v) / (predicted + v) of that kind's raw path probabilities (``path_weight`` = v, in
    acceptances) and a node is never made likelier than its parent."""

    prior_weight: float = 4.0
    request_weight: float = 2.0
    path_weight: float = 4.0
    accepted: np.ndarray = field(default_factory=lambda: np.zeros((len(KINDS), len(_BINS) - 1)))
    tested: np.ndarray = field(default_factory=lambda: np.zeros((len(KINDS), len(_BINS) - 1)))
    request_accepted: np.ndarray = field(default_factory=lambda: np.zeros(len(KINDS)))
    request_predicted: np.ndarray = field(default_factory=lambda: np.zeros(len(KINDS)))
    path_accepted: np.ndarray = field(default_factory=lambda: np.zeros(len(KINDS)))
    path_predicted: np.ndarray = field(default_factory=lambda: np.zeros(len(KINDS)))

    def table(self) -> np.ndarray:
        centres = (_BINS[:-1] + np.minimum(_BINS[1:], 1.0)) / 2
        return (self.accepted + self.prior_weight * centres) / (self.tested + self.prior_weight)

    def request_factors(self) -> np.ndarray:
        """float64 [len(KINDS)]: this request's accepted / predicted per node kind, smoothed towards 1."""
        w = self.request_weight
        return (self.request_accepted + w) / (self.request_predicted + w)

    def begin_request(self) -> None:
        self.request_accepted[:] = 0.0
        self.request_predicted[:] = 0.0

    def for_request(self) -> AcceptanceModel:
        """A model for one more request in flight beside this one (a batch row): it shares every array
        learned over requests (the table and the path calibration; what it observes teaches this model
        too) and has its own, fresh per-request factors."""
        return replace(self, request_accepted=np.zeros(len(KINDS)), request_predicted=np.zeros(len(KINDS)))

    def _features(self, tree: TokenTree) -> tuple[np.ndarray, np.ndarray]:
        kind, feature = node_kinds(tree)
        return kind, np.clip(np.searchsorted(_BINS, feature, side="right") - 1, 0, len(_BINS) - 2)

    def path_calibration(self) -> np.ndarray:
        """float64 [len(KINDS)]: accepted / predicted raw path probability per node kind over every
        verified tree, smoothed towards 1."""
        v = self.path_weight
        return (self.path_accepted + v) / (self.path_predicted + v)

    def _node_probs(self, kind: np.ndarray, bins: np.ndarray) -> np.ndarray:
        return np.minimum(self.table()[kind, bins] * self.request_factors()[kind], 1.0)

    def node_probs(self, tree: TokenTree) -> np.ndarray:
        """float64 [N]: estimated acceptance of each node given its parent was reached."""
        if not len(tree):
            return np.zeros(0)
        return self._node_probs(*self._features(tree))

    def path_probs(self, tree: TokenTree, node_probs: np.ndarray | None = None) -> np.ndarray:
        """float64 [N]: P(node accepted): the product of node probabilities along its root path, scaled
        by its kind's path calibration, never above its parent's."""
        if not len(tree):
            return np.zeros(0)
        kind, bins = self._features(tree)
        probs = self._node_probs(kind, bins) if node_probs is None else node_probs
        scaled = path_products(tree.parents, probs) * self.path_calibration()[kind]
        for i, p in enumerate(tree.parents.tolist()):
            if p >= 0 and scaled[i] > scaled[p]:
                scaled[i] = scaled[p]
        return np.minimum(scaled, 1.0)

    def observe(self, tree: TokenTree, acceptance: Acceptance) -> None:
        """Every node whose parent was reached was tested; those on the accepted path were accepted."""
        if not len(tree):
            return
        kind, bins = self._features(tree)
        reached = np.zeros(len(tree) + 1, dtype=bool)
        reached[0] = True
        reached[np.asarray(acceptance.path, dtype=np.int64) + 1] = True
        tested = reached[tree.parents + 1]
        on_path = np.asarray(acceptance.path, dtype=np.int64)
        np.add.at(self.path_predicted, kind, path_products(tree.parents, self._node_probs(kind, bins)))
        np.add.at(self.path_accepted, kind[on_path], 1.0)
        np.add.at(self.request_predicted, kind[tested], self.table()[kind[tested], bins[tested]])
        np.add.at(self.request_accepted, kind[on_path], 1.0)
        np.add.at(self.tested, (kind[tested], bins[tested]), 1.0)
        np.add.at(self.accepted, (kind[on_path], bins[on_path]), 1.0)


@dataclass(frozen=True)
class PlannerConfig:
    """The planner's constants, each with the reason for its default.

    prior_weight: pseudo-tests at "acceptance = the node's feature" before any observation; 4 lets about
        a dozen real steps outweigh the prior while keeping the first steps sane.
    request_weight: how many expected acceptances of a kind the current request needs before its own
        accepted/predicted ratio moves that kind's estimates halfway; 2 reacts within a few steps (a chat
        answer that never follows the corpus) without one unlucky step zeroing a source.
    cost_smoothing: EMA weight of each step's measured/predicted verification time (cost_scale); 0.1
        follows context growth and machine load within ~10 steps without chasing one slow step.
    lookahead: expansion forwards :meth:`Planner.plan_expansion` simulates; one forward alone rarely pays
        once retrieval already gave a good chain, 4-6 often do (dev split: 6 beat 1-3 on code and docqa).
    explore_every: every this many steps the draft model runs even when retrieval alone looked better,
        so a draft whose acceptance improved is noticed again.
    rate_smoothing: EMA weight of the rate and tokens per step of drafted steps (what skipping is
        compared against); 0.2 = about the last five drafted steps. The planner's first drafted step is
        not learned from: it pays one-off costs.
    min_drafted_steps: drafted steps learned from before that rate is trusted (before it, the draft runs
        every step and :attr:`PlanView.seconds_per_drafted_token` is None). One step is no estimate: a
        first drafted step whose first guess missed commits one token, and skipping against it locked the
        draft out until the next explored step (Spec-Bench on an EPYC: the first question's draft ran
        from its 17th step only, 47 steps where 31 sufficed in later runs).
    """

    prior_weight: float = 4.0
    request_weight: float = 2.0
    cost_smoothing: float = 0.1
    lookahead: int = 6
    explore_every: int = 16
    rate_smoothing: float = 0.2
    min_drafted_steps: int = 4

    def __post_init__(self) -> None:
        if self.prior_weight <= 0 or self.request_weight <= 0:
            raise ValueError("prior_weight and request_weight must be > 0")
        for name in ("cost_smoothing", "rate_smoothing"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in ("lookahead", "explore_every", "min_drafted_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Planner:
    """Chooses tree sizes and whether drafting pays, from the cost curve and learned acceptance.

    cost: T(n) of the target's verification forward (see :func:`rasd.costmodel.profile_verify`).
    Owned and updated by the decoding loop alone (:meth:`observe`); drafters get :meth:`view`.
    """

    def __init__(self, cost: CostCurve, config: PlannerConfig | None = None) -> None:
        self.cost = cost
        self.config = config or PlannerConfig()
        self.acceptance = AcceptanceModel(
            prior_weight=self.config.prior_weight, request_weight=self.config.request_weight
        )
        self.cost_scale = 1.0  # measured / predicted verification time (context length, machine load)
        self.draft_rate: float | None = None  # tokens/s of steps that ran the draft model
        self.draft_tokens: float | None = None  # tokens committed per step that ran the draft model
        self.drafted_steps = 0  # steps observed that ran the draft model (the first is not learned from)

    @property
    def draft_rate_known(self) -> bool:
        """Whether enough drafted steps were learned from to trust the rate (``min_drafted_steps``)."""
        return self.draft_rate is not None and self.drafted_steps > self.config.min_drafted_steps

    def begin_request(self) -> None:
        """A new request starts: per-request acceptance factors start afresh (what was learned across
        requests stays)."""
        self.acceptance.begin_request()

    def view(self) -> PlanView:
        """A read-only view for drafters (the loop keeps the planner itself)."""
        return PlanView(self)

    # -- costs -------------------------------------------------------------------------------------
    def verify_seconds(self, nodes: int) -> float:
        return self.cost_scale * self.cost(nodes + 1)

    # -- decisions ---------------------------------------------------------------------------------
    def rate(self, expected_tokens: float, nodes: int, sunk_seconds: float) -> float:
        return expected_tokens / (sunk_seconds + self.verify_seconds(nodes))

    def _best_prefix(
        self, parents: Sequence[int], path: np.ndarray, sunk_seconds: float, max_nodes: int | None
    ) -> tuple[list[int], int]:
        """(best-first order, how many of it to keep)."""
        order = best_first_order(parents, path)
        if max_nodes is not None:
            order = order[:max_nodes]
        gains = np.concatenate([[1.0], 1.0 + np.cumsum(path[order])])
        rates = [gains[n] / (sunk_seconds + self.verify_seconds(n)) for n in range(len(order) + 1)]
        return order, int(np.argmax(rates))

    def trim(self, tree: TokenTree, sunk_seconds: float = 0.0, max_nodes: int | None = None) -> TokenTree:
        """The best-first prefix of ``tree`` that maximises expected tokens per second."""
        if not len(tree):
            return tree
        order, best = self._best_prefix(
            tree.parents, self.acceptance.path_probs(tree), sunk_seconds, max_nodes
        )
        return keep_first(tree, order, best)

    def expected_tokens(self, tree: TokenTree) -> float:
        return 1.0 + float(self.acceptance.path_probs(tree).sum()) if len(tree) else 1.0

    def plan_expansion(
        self,
        tree: TokenTree,
        candidates: list[int],
        sunk_seconds: float,
        child_prob: float,
        forward_seconds: float | None,
        max_nodes: int | None = None,
    ) -> int:
        """How many of ``candidates`` (tree node indices, best first) the next draft forward should feed:
        0 when no plan of up to ``config.lookahead`` more forwards raises the step's expected rate.

        A simulated forward that feeds node f gives it one child accepted with probability ``child_prob``
        (the learned quality of the draft's best child) and costs ``forward_seconds`` (the drafter's own
        measure of its forwards; None = not measured yet: feed every candidate), and that child becomes a
        candidate for the next simulated forward. Rates are computed on the path probabilities sorted in
        decreasing order (a child never beats its parent), which is what the real trim keeps, without
        building trees.
        """
        if not candidates:
            return 0
        if forward_seconds is None:
            return len(candidates)  # nothing measured yet: explore
        lookahead = self.config.lookahead
        path = self.acceptance.path_probs(tree)
        cap = len(path) + lookahead * len(candidates) if max_nodes is None else max_nodes
        costs = self.cost_scale * np.array([self.cost(n + 1) for n in range(cap + 1)])
        now = self._sorted_rate(path, sunk_seconds, costs)
        best_m, best_rate = 0, now
        for m in range(1, len(candidates) + 1):
            kept = list(path[candidates])
            grown: list[float] = []
            seconds = sunk_seconds
            for _ in range(lookahead):
                kept.sort(reverse=True)
                feed, kept = kept[:m], kept[m:]
                children = [p * child_prob for p in feed]
                grown += children
                kept += children
                seconds += forward_seconds
                rate = self._sorted_rate(np.concatenate([path, grown]), seconds, costs)
                if rate > best_rate:
                    best_m, best_rate = m, rate
        return best_m

    @staticmethod
    def _sorted_rate(path: np.ndarray, seconds: float, costs: np.ndarray) -> float:
        """max over n of (1 + sum of the n largest path probabilities) / (seconds + T(n))."""
        top = np.sort(path)[::-1][: len(costs) - 1]
        gains = np.concatenate([[1.0], 1.0 + np.cumsum(top)])
        return float(np.max(gains / (seconds + costs[: len(gains)])))

    def should_draft(self, retrieval_tree: TokenTree, step: int) -> bool:
        """Run the draft model this step, or verify the retrieval tree alone?

        Skips the draft only when the retrieval tree alone is expected to commit at least as many tokens
        as drafted steps do (a long verbatim match) *and* to reach a higher rate than the learned rate of
        drafted steps. Requiring both matters: a short retrieval chain verified alone is cheap and may
        look faster per step, but it takes many more steps, and every skipped step leaves the draft model
        more tokens to catch up on later (measured on HumanEval dev with the Qwen pair: skipping on rate
        alone made RASD 25% slower than always drafting). Every ``explore_every``-th step drafts, and every
        step until ``min_drafted_steps`` drafted steps were learned from.
        """
        if not self.draft_rate_known or self.draft_tokens is None or step % self.config.explore_every == 0:
            return True
        alone = self.trim(retrieval_tree)
        expected = self.expected_tokens(alone)
        return not (expected >= self.draft_tokens and self.rate(expected, len(alone), 0.0) > self.draft_rate)

    # -- learning (the loop only) ------------------------------------------------------------------
    def observe(
        self,
        tree: TokenTree,
        acceptance: Acceptance,
        *,
        draft_seconds: float,
        verify_seconds: float,
        drafted: bool = False,
    ) -> None:
        """Learn from one verified step: acceptance per node kind, the verification cost's scale and the
        rate of drafted steps."""
        self.acceptance.observe(tree, acceptance)
        predicted = self.cost(len(tree) + 1)
        self.cost_scale = _ema(self.cost_scale, verify_seconds / predicted, self.config.cost_smoothing)
        if drafted:
            self.drafted_steps += 1
            if self.drafted_steps == 1:
                # The first drafted step pays one-off costs (the draft's first forwards at new shapes:
                # 0.39 s per token vs 0.24 s for a plain step with the Qwen pair); learned from, it kept
                # drafting down to one step in explore_every until an explored step outweighed it.
                return
            rate = len(acceptance.tokens) / max(draft_seconds + verify_seconds, 1e-9)
            weight = self.config.rate_smoothing
            self.draft_rate = _ema(self.draft_rate, rate, weight)
            self.draft_tokens = _ema(self.draft_tokens, float(len(acceptance.tokens)), weight)


class PlanView:
    """What a drafter may read from the planner: costs, acceptance estimates and the planner's pure
    decisions (the :class:`Planner` methods of the same names). It has no way to change the planner: the
    loop alone calls :meth:`Planner.observe`."""

    __slots__ = (
        "_planner",
        "node_probs",
        "path_probs",
        "plan_expansion",
        "should_draft",
        "trim",
        "verify_seconds",
    )

    def __init__(self, planner: Planner) -> None:
        self._planner = planner
        self.verify_seconds = planner.verify_seconds  # nodes -> predicted seconds of verifying them
        self.node_probs = planner.acceptance.node_probs  # tree -> P(accepted | parent reached) [N]
        self.path_probs = planner.acceptance.path_probs  # tree -> P(accepted) [N]
        self.trim = planner.trim
        self.plan_expansion = planner.plan_expansion
        self.should_draft = planner.should_draft

    @property
    def seconds_per_drafted_token(self) -> float | None:
        """Learned wall seconds per committed token on steps that ran the draft model (None: none yet)."""
        rate = self._planner.draft_rate
        return 1.0 / rate if rate and self._planner.draft_rate_known else None


def _ema(old: float | None, new: float, weight: float) -> float:
    return new if old is None else (1 - weight) * old + weight * new
