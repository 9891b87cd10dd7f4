"""RASD: retrieval trees and a draft-model tree fused into one tree under one budget.

Per step: every retriever proposes a tree (prompt lookup over the prompt and output, corpus lookup over a
static datastore, token recycling over the target's own past logits); the trees are fused by
longest-prefix matching (:func:`merge_trees`); the fused retrieval tree seeds the draft model, which scores
every retrieval node with its own probabilities (the pruning signal) and expands the most promising nodes
(draft and retrieval alike); the decoding loop's planner then keeps the best-first prefix that maximises
expected tokens per second under the measured cost of verification. When the plan expects the retrieval
tree alone to beat drafting (a long verbatim match, or a draft that does not pay on this machine), the
draft model is not expanded that step; the skip is confirmed first on the draft's own probabilities of the
retrieval nodes, which its catch-up forward gives (the committed tokens it must read anyway, plus the most
promising seed nodes). Spec-Bench, Qwen pair, 8 short-prompt questions (writing, roleplay, math,
translation, QA, and a second turn that copies its first), 3 rounds, order rotated: unconfirmed, 9 of 26
skips committed at most one token (a whole target step for it); confirmed, 2 of 22, and the skips committed
260 tokens against 232. Decode time -0.5 % (191.6 s against 192.6 s; the draft alone 187.8 s).

Retrieval nodes join a request's drafted steps only while they pay there (the seed gate, ``gate_seeds``):
on chat, translation, QA and math the draft model already proposes almost every token retrieval would
(Spec-Bench, Qwen pair: 0-7 tokens in 40-50 drafted steps came from retrieval alone), and seeded, the
retrieval nodes only took the place of the draft's own (smaller trees, more steps) and mixed the draft's
acceptance estimates with theirs. From a request's GATE_STEPS-th drafted step on, the seed is left out of
drafted steps while retrieval has added fewer than GATE_RATE tokens per drafted step beyond the draft's own
(seeded: the accepted path past the first node the draft did not propose; left out: how much further the
seed held the committed tokens than the draft's accepted path, so a request that starts to quote opens the
gate again). Steps the plan would verify undrafted still see every retrieval tree, so long verbatim copies
keep their skips. Measured (Qwen pair, AVX-512 EPYC, 10 Spec-Bench turns with short prompts: multi-turn
with two second turns, translation, QA, math; 26 runs per contender in two sessions, order rotated, every
output identical): decode time summed 227.9 s gated, 232.7 s always seeded (-2.1 %), the draft alone 227.6
s; run-to-run noise per question is of the same size.

Token Recycling's trees (retrievers whose ``seeds_draft`` is False) join only the steps the draft model does
not expand: retrieval-only steps, the probe's steps before the draft's prefill, and steps the plan verifies
undrafted. On a step the draft expands they are left out of its seed: their breadth-first candidates
displaced the draft's own (Spec-Bench, Qwen pair, 96 tokens, 12 questions two per column, one round,
order rotated: decode time 3.7 % lower per question (geometric mean), 8 of 12 faster, 255 target steps
against 262; with drafting forced from the start, math q401 took 21 steps with recycling in the seed, 18
without, as many as the draft alone).

The draft model's prefill of the prompt is its own decision (:meth:`DraftModel.ready`): where it is
expensive, the first steps are retrieval-only and measure what the draft would save over them in this
request; the prefill runs once the saving forgone reaches its price, so a short answer after a long
prompt never pays it (the proposal that follows reports it as ``draft_prefill``).

``overlap=True`` changes only when retrieval runs: in a worker thread while the draft model catches up on
the committed tokens (the native datastore releases the GIL). The drafting policy is the same in both
modes: the decision is taken on the same retrieval tree, after the catch-up instead of before it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from rasd.drafting.base import DraftContext, Drafter, Proposal, StepBudget, StepResult
from rasd.drafting.draft_model import DraftModel
from rasd.drafting.fusion import merge_trees
from rasd.tree import Source, TokenTree


class Fused:
    """retrievers: drafters whose trees are deterministic (PromptLookup, CorpusLookup, TokenRecycling, ...).
    draft: the draft-model drafter, or None for retrieval-only speculation (PLD/REST-style).
    overlap: run retrieval in a worker thread during the draft's catch-up forward.
    """

    # The seed gate (``gate_seeds``): retrieval nodes join this request's drafted steps while they add at
    # least GATE_RATE tokens per drafted step beyond the draft's own (after GATE_STEPS drafted steps).
    GATE_STEPS = 6
    GATE_RATE = 0.1

    def __init__(
        self,
        retrievers: Sequence[Drafter],
        draft: DraftModel | None = None,
        *,
        overlap: bool = False,
        gate_seeds: bool = True,
    ) -> None:
        if not retrievers and draft is None:
            raise ValueError("Fused needs at least one retriever or a draft model")
        self.retrievers = list(retrievers)
        self.draft = draft
        self.overlap = overlap and draft is not None and bool(self.retrievers)  # (per request: draft.active)
        self.gate_seeds = gate_seeds
        self._pool = ThreadPoolExecutor(max_workers=1) if self.overlap else None
        self.step = 0
        self._begin_gate()

    def _begin_gate(self) -> None:
        self.judged_steps = 0  # drafted steps of this request measured for the seed gate
        self.marginal_tokens = 0  # tokens retrieval committed (or would have) beyond the draft's own
        self.unseeded_steps = 0  # drafted steps of this request verified without retrieval nodes
        self._last: tuple[TokenTree, bool, bool] | None = None  # (the draft's seed, drafted, seeded)

    def seeding(self) -> bool:
        """Whether retrieval nodes join this request's next drafted step (see the module docstring)."""
        if not self.gate_seeds or self.judged_steps < self.GATE_STEPS:
            return True
        return self.marginal_tokens >= self.GATE_RATE * self.judged_steps

    def begin(self, context: DraftContext) -> None:
        self.step = 0
        self._begin_gate()
        for r in self.retrievers:
            r.begin(context)
        if self.draft is not None:
            self.draft.begin(context, probe=bool(self.retrievers))

    def _retrieve(self, budget: StepBudget, *, with_seed: bool = False) -> tuple[TokenTree, TokenTree, float]:
        """(every retriever's tree fused; with ``with_seed``, the draft model's seed: the same without the
        trees of retrievers that do not seed it (``seeds_draft`` False), else the fused tree itself; the
        wall seconds it took). The seed is merged only for steps that may draft."""
        start = time.perf_counter()
        trees = [(r.propose(budget).tree, getattr(r, "seeds_draft", True)) for r in self.retrievers]
        full = merge_trees([t for t, _ in trees])
        seed = full
        seeding = [t for t, seeds in trees if seeds]
        if with_seed and len(seeding) < len(trees):  # some left out of the draft's seed
            seed = merge_trees(seeding) if seeding else TokenTree.empty()
        return full, seed, time.perf_counter() - start

    def propose(self, budget: StepBudget) -> Proposal:
        self.step += 1
        if self.draft is None:
            tree, _, seconds = self._retrieve(budget)
            return Proposal(tree, retrieval_seconds=seconds)
        if not self.draft.ready():  # ready() may run a deferred prefill
            tree, _, seconds = self._retrieve(budget)
            return Proposal(tree, retrieval_seconds=seconds, **self.draft.take_reports())
        return dataclasses.replace(self._with_draft(budget), **self.draft.take_reports())

    def _with_draft(self, budget: StepBudget) -> Proposal:
        plan, step = budget.plan, self.step

        def keep_drafting(seed: TokenTree) -> bool:
            return plan is None or plan.should_draft(seed, step)

        seeding = self.seeding()
        if self.overlap:
            future = self._pool.submit(self._retrieve, budget, with_seed=True)
            drafting: list[bool] = []  # keep_drafting(full), asked once

            def drafts_anyway() -> bool:
                if not drafting:
                    drafting.append(keep_drafting(future.result()[0]))
                return drafting[0]

            def seed() -> TokenTree:
                # Gated off, the seed joins only a step that may skip (the skip needs the draft's scores).
                return future.result()[1] if seeding or not drafts_anyway() else TokenTree.empty()

            proposal = self.draft.expand(
                budget, seed=seed, keep_drafting=lambda scored: drafts_anyway() or keep_drafting(scored)
            )
            full, seeds, seconds = future.result()
            seeded = seeding or not drafts_anyway()
        else:
            full, seeds, seconds = self._retrieve(budget, with_seed=True)
            # A skip is confirmed on the draft's own scores of the retrieval nodes (its catch-up forward).
            confirm = None if keep_drafting(full) else keep_drafting
            seeded = seeding or confirm is not None
            seed = seeds if seeded else TokenTree.empty()
            proposal = self.draft.expand(budget, seed=seed, sunk_seconds=seconds, keep_drafting=confirm)
        if not proposal.drafted:  # verified undrafted: every retriever's tree, the seed's nodes scored
            proposal = dataclasses.replace(proposal, tree=merge_trees([proposal.tree, full]))
        self._last = (seeds, proposal.drafted, seeded)
        return dataclasses.replace(proposal, retrieval_seconds=seconds)

    def _judge(self, step: StepResult) -> None:
        """Seed gate: what retrieval added on a drafted step beyond the draft's own nodes. Seeded, the
        accepted path past its first node the draft did not propose itself; unseeded, how much further
        the seeding retrievers' tree held the committed tokens than the draft's accepted path (a lower
        bound)."""
        if self._last is None or not self._last[1]:
            return
        seeds, _, seeded = self._last
        own = 0  # leading accepted nodes the draft proposed itself
        for node in step.path:
            if not step.tree.sources[node] & Source.DRAFT:
                break
            own += 1
        beyond = max(len(step.path) - own, seeds.match_depth(step.tokens) - own, 0)
        self.judged_steps += 1
        self.marginal_tokens += beyond
        self.unseeded_steps += not seeded

    def advance(self, step: StepResult) -> None:
        self._judge(step)
        self._last = None
        for r in self.retrievers:
            r.advance(step)
        if self.draft is not None:
            self.draft.advance(step)
