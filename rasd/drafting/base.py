"""The step contract: the one protocol between the decoding loop and every drafter.

This docstring is the contract's single source of truth. One sequence goes::

    drafter.begin(context)                  # DraftContext: the prompt, sampling settings, generator
    loop:
        proposal = drafter.propose(budget)  # StepBudget in, Proposal out
        ... the loop trims proposal.tree to what pays, the target verifies it ...
        drafter.advance(step)               # StepResult: the committed tokens and what the target said

Rules:

- ``begin`` receives everything a drafter may need about the request (a :class:`DraftContext`); the
  loop never calls anything else to configure a drafter.
- ``propose`` returns a frozen :class:`Proposal`: the tree (at most ``budget.max_nodes`` nodes, in
  topological order) and the facts the loop records (whether a model forward ran, seconds spent retrieving
  and drafting). The loop reads nothing else from a drafter: no attributes,
  no ``hasattr``.
- The loop alone owns the :class:`rasd.planner.Planner`. A drafter that plans its own expansion (the draft
  model) reads ``budget.plan``, a read-only :class:`rasd.planner.PlanView` (cost curve and acceptance
  estimates), or ``None`` when the loop runs without a planner. The loop trims every proposal the same way
  (the planner's best-first prefix, or the first ``max_nodes`` nodes in best-first order without one).
- ``advance`` receives a :class:`StepResult`: the committed tokens (accepted path, then the bonus token),
  the verified tree, the accepted path, and the target's logits at the root and at every node, so a
  drafter can learn from verification (Token Recycling keeps the target's top-k successors of every token).

A new drafter is one small class with these three methods (see ``tests/test_drafter_contract.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from rasd.tree import TokenTree

if TYPE_CHECKING:
    from rasd.planner import PlanView
    from rasd.verify import SamplingConfig


@dataclass(frozen=True)
class DraftContext:
    """What a drafter learns about a request when it begins.

    prompt:    the committed tokens (non-empty); the last one is the root of the first tree.
    sampling:  the target's sampling settings (``do_sample=False``: greedy). A drafter that samples its
               candidates draws them from a distribution processed the same way.
    generator: the request's random generator (sampling only), shared with acceptance.
    max_new_tokens: how many tokens the request may still produce (a drafter may decide that an expensive
               set-up, such as a draft model's prefill of a long prompt, does not pay for a short answer).
    plan:      the read-only planner view (None without a planner), for such decisions.
    """

    prompt: tuple[int, ...]
    sampling: SamplingConfig
    generator: torch.Generator | None = None
    max_new_tokens: int | None = None
    plan: PlanView | None = None

    def __post_init__(self) -> None:
        if not self.prompt:
            raise ValueError("the prompt is empty: a drafter needs at least one committed token")


@dataclass(frozen=True)
class StepBudget:
    """What ``propose`` may spend.

    max_nodes: tree nodes at most (0 = propose nothing).
    plan:      read-only planner view (verification cost, acceptance estimates, draft forward cost), or
               None when the loop runs without a planner.
    """

    max_nodes: int
    plan: PlanView | None = None


# A draft model's per-request choice (DraftModel.begin): "run" prefills with the prompt and drafts from the
# first step; "probe" starts with retrieval-only steps and prefills once their measured saving repays the
# prefill (a deferred DraftPrefill; an answer that ends first never pays it); "skip" never runs the draft in
# this request (its prefill costs more than drafting could save over max_new_tokens).
DRAFT_DECISIONS = ("run", "probe", "skip")


@dataclass(frozen=True)
class DraftPrefill:
    """When a draft model prefilled a request's context.

    after_tokens: new tokens committed before it (0: at ``begin``, with the prompt; n > 0: deferred until
                  retrieval-only steps had committed n tokens and the measured saving repaid it).
    seconds:      its wall seconds.
    """

    after_tokens: int
    seconds: float

    @property
    def deferred(self) -> bool:
        """Ran inside a ``propose`` (its seconds are in that call's wall time), not in ``begin``."""
        return self.after_tokens > 0


@dataclass(frozen=True)
class Proposal:
    """A drafter's answer to one ``propose``.

    tree:              the candidates (:class:`TokenTree`, at most the budget's nodes).
    drafted:           a draft model ran at least one forward for this tree.
    retrieval_seconds: wall seconds the drafter spent in retrieval (datastores, tables).
    draft_seconds:     wall seconds the drafter spent in draft-model forwards and their bookkeeping.
    draft_prefill:     set on the first proposal after the draft model prefilled the request's context
                       (:class:`DraftPrefill`); a prefill run inside this ``propose`` (deferred) is in neither
                       seconds above, and the loop books it as set-up, not as this step's drafting.
    draft_decision:    set on a request's first proposal by a drafter that holds a draft model: what it chose
                       for this request at ``begin``, one of :data:`DRAFT_DECISIONS`.
    With retrieval overlapped with drafting, retrieval and draft seconds can sum to more than the wall time
    of ``propose``: each is the time that work took, not a share of the wall clock.
    """

    tree: TokenTree
    drafted: bool = False
    retrieval_seconds: float = 0.0
    draft_seconds: float = 0.0
    draft_prefill: DraftPrefill | None = None
    draft_decision: str | None = None

    @classmethod
    def empty(cls) -> Proposal:
        return cls(TokenTree.empty())


@dataclass(frozen=True, eq=False)
class StepResult:
    """What one verification step committed, for ``advance``.

    tokens: the committed tokens: the accepted path's tokens, then the bonus token (>= 1 token).
    tree:   the tree the target verified (after the loop's trim).
    path:   accepted node indices of ``tree``, root first (excluded) to deepest.
    logits: the target's logits [N + 1, V] (row 0 the root, row i + 1 node i) or None where the loop
            did not keep them; use :meth:`top_tokens` rather than reading them directly.
    """

    tokens: tuple[int, ...]
    tree: TokenTree = field(default_factory=TokenTree.empty)
    path: tuple[int, ...] = ()
    logits: torch.Tensor | None = None
    _top: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def top_tokens(self, k: int) -> np.ndarray | None:
        """int64 [N + 1, k]: the target's k most likely next tokens after the root and after every node,
        best first (computed once per step and k), or None without logits."""
        if self.logits is None:
            return None
        if k not in self._top:
            self._top[k] = torch.topk(self.logits, k, dim=-1).indices.cpu().numpy()
        return self._top[k]


@runtime_checkable
class Drafter(Protocol):
    """Proposes candidate trees; learns from what was committed (see the module docstring)."""

    def begin(self, context: DraftContext) -> None:
        """Start a new sequence."""

    def propose(self, budget: StepBudget) -> Proposal:
        """Candidates continuing the committed tokens, at most ``budget.max_nodes`` nodes."""

    def advance(self, step: StepResult) -> None:
        """``step.tokens`` were committed after the last proposal."""


class StaticTreeDrafter:
    """Proposes whatever a callable returns for the committed tokens (tests, oracles, custom drafters).

    ``tree_fn(committed_tokens) -> TokenTree``; trees larger than the budget are cut to their first
    ``max_nodes`` nodes (a prefix of a topologically ordered tree is a tree).
    """

    def __init__(self, tree_fn: Callable[[list[int]], TokenTree]) -> None:
        self.tree_fn = tree_fn
        self.tokens: list[int] = []

    def begin(self, context: DraftContext) -> None:
        self.tokens = list(context.prompt)

    def propose(self, budget: StepBudget) -> Proposal:
        tree = self.tree_fn(self.tokens)
        if len(tree) > budget.max_nodes:
            tree = tree.subtree(np.arange(len(tree)) < budget.max_nodes)
        return Proposal(tree)

    def advance(self, step: StepResult) -> None:
        self.tokens.extend(step.tokens)
