"""The step contract (rasd.drafting.base): a new drafter is one small class, and Token Recycling's table."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rasd import SpeculativeGenerator
from rasd.drafting import DraftContext, Proposal, RecyclingConfig, StepBudget, StepResult, TokenRecycling
from rasd.testing import tiny_model
from rasd.tree import TokenTree
from rasd.verify import SamplingConfig


class BigramDrafter:
    """Proposes the chain of most frequent successors from a bigram table of the committed text: a whole
    drafter in a dozen lines, knowing nothing of planners, masks or the loop."""

    def __init__(self, depth: int = 4) -> None:
        self.depth = depth
        self.next: dict[int, dict[int, int]] = {}
        self.tokens: list[int] = []

    def _learn(self, tokens) -> None:
        for a, b in zip([*self.tokens[-1:], *tokens], tokens, strict=False):
            counts = self.next.setdefault(a, {})
            counts[b] = counts.get(b, 0) + 1
        self.tokens += list(tokens)

    def begin(self, context: DraftContext) -> None:
        self.next, self.tokens = {}, []
        self._learn(context.prompt)

    def propose(self, budget: StepBudget) -> Proposal:
        chain, token = [], self.tokens[-1]
        while len(chain) < min(self.depth, budget.max_nodes) and token in self.next:
            token = max(self.next[token], key=self.next[token].get)
            chain.append(token)
        return Proposal(TokenTree.chain(chain))

    def advance(self, step: StepResult) -> None:
        self._learn(step.tokens)


def test_a_new_drafter_in_one_file_is_token_identical():
    model = tiny_model("qwen2", vocab_size=48, seed=5)
    rng = np.random.default_rng(0)
    gen = SpeculativeGenerator(model, BigramDrafter(), fast_path=False)
    accepted = 0
    for _ in range(6):
        base = rng.integers(2, 48, size=5).tolist()
        ids = base * 4
        ref = model.generate(torch.tensor([ids]), max_new_tokens=30, do_sample=False, eos_token_id=None)
        out = gen.generate(ids, max_new_tokens=30, eos_token_id=[])
        assert out.sequences[0, len(ids) :].tolist() == ref[0, len(ids) :].tolist()
        accepted += out.stats.new_tokens - out.stats.steps
    assert accepted > 0


def test_recycling_learns_the_targets_successors_from_every_verified_node():
    """Row 0 of the step's logits is the target's prediction after the root, row i + 1 after node i,
    rejected nodes included; the next tree starts from the last committed token."""
    vocab, k = 20, 3
    drafter = TokenRecycling(vocab, RecyclingConfig(k=k, widths=(3, 1), rank_prior=(0.5, 0.2, 0.1)))
    drafter.begin(DraftContext((4, 7), SamplingConfig()))
    assert drafter.propose(StepBudget(8)).tree.tokens.tolist() == []  # 7 ends the prompt: no successor
    assert drafter.table[4, 0] == 7  # warm start from the prompt's own bigram
    tree = TokenTree([9, 11], [-1, -1])  # node 0 accepted, node 1 rejected
    logits = torch.zeros(3, vocab)
    logits[0, [9, 2, 3]] = torch.tensor([5.0, 4.0, 3.0])  # after the root (7)
    logits[1, [12, 13, 14]] = torch.tensor([5.0, 4.0, 3.0])  # after node 0 (9)
    logits[2, [15, 16, 17]] = torch.tensor([5.0, 4.0, 3.0])  # after the rejected node 1 (11)
    drafter.advance(StepResult((9, 12), tree, (0,), logits))
    assert drafter.table[7].tolist() == [9, 2, 3]
    assert drafter.table[9].tolist() == [12, 13, 14]
    assert drafter.table[11].tolist() == [15, 16, 17]
    drafter.table[12] = [9, 5, 6]
    proposal = drafter.propose(StepBudget(4))
    assert proposal.tree.tokens.tolist()[:1] == [9]  # root 12: its top-1 successor first
    assert set(proposal.tree.tokens.tolist()) <= {9, 5, 6, 12, 13, 14}
    assert len(proposal.tree) == 4 and proposal.retrieval_seconds >= 0 and not proposal.drafted
    assert (proposal.tree.sources == 8).all()  # Source.RECYCLE
    drafter.begin(DraftContext((9, 1, 7, 8), SamplingConfig()))  # learned rows win over the prompt's
    assert drafter.table[9].tolist() == [12, 13, 14] and drafter.table[7].tolist() == [9, 2, 3]
    assert drafter.table[1, 0] == 7


@pytest.mark.real_model
def test_recycling_alone_speculates_on_real_text(smollm2):
    """SmolLM2: recycling alone is token-identical and commits more than one token per forward (cold table:
    three short chat answers; the table warms up over requests). No planner: whether the planner spends
    nodes on a cold table depends on the cost curve; this test is about what the drafter proposes."""
    from rasd import tasks

    model, tok = smollm2
    gen = SpeculativeGenerator(
        model, recycling=True, prompt_lookup=False, planner=None, max_tree_nodes=16, tokenizer=tok
    )
    steps = tokens = 0
    for p in tasks.prompts("chat", "test", 3):
        ids = p.render(tok)[-400:]
        ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids) :].tolist()
        out = gen.generate(ids, max_new_tokens=48, do_sample=False)
        assert out.sequences[0, len(ids) : len(ids) + len(ref)].tolist() == ref, p.id
        steps, tokens = steps + out.stats.steps, tokens + out.stats.new_tokens
    assert tokens / steps > 1.0
