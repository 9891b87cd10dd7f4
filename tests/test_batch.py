"""Batched speculative generation (rasd.batch): the packed masks and positions, the batched KV cache against
one session per row, the joint planner, greedy outputs identical to HF ``generate`` on each row alone (tiny
and real models, left padding, rows finishing and joining), and the target's law when sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rasd import Datastore, SpeculativeGenerator, tasks
from rasd.batch import (
    BatchedGenerator,
    BatchedSession,
    BatchStats,
    batch_inputs,
    choose_width,
    packed_inputs,
    plan_batch,
    prefill_packs,
)
from rasd.drafting import DraftTreeConfig, StaticTreeDrafter
from rasd.planner import AcceptanceModel
from rasd.testing import tiny_model
from rasd.tree import Source, TokenTree, attention_inputs
from rasd.verify import Acceptance, TargetSession
from tests.test_verify import _chi_square_pvalue

V = 64


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    """Random prompts of different lengths (1 to ~32 tokens) with repeated spans for prompt lookup."""
    rng = np.random.default_rng(seed)
    out = [[int(rng.integers(2, V))]]  # a one-token prompt: nothing cached for that row
    while len(out) < n:
        base = rng.integers(2, V, size=int(rng.integers(4, 12))).tolist()
        out.append((base * 3)[: int(rng.integers(6, 30))] + rng.integers(2, V, size=3).tolist())
    return out[:n]


def _left_padded(prompts: list[list[int]], pad: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(p)
        mask[b, width - len(p) :] = 1
    return ids, mask


def _hf_alone(model, ids: list[int], max_new: int, **kw) -> list[int]:
    """HF greedy ``generate`` on one row, unpadded: the reference every batched row must equal."""
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(
            x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False, **kw
        )
    return out[0, len(ids) :].tolist()


def _random_tree(rng: np.random.Generator, n: int) -> TokenTree:
    parents = [int(rng.integers(-1, i)) for i in range(n)]
    return TokenTree(rng.integers(0, V, size=n), parents, sources=np.full(n, int(Source.PROMPT)))


def _random_acceptance(rng: np.random.Generator, tree: TokenTree) -> Acceptance:
    """A root path to a random node (or the empty path) and a random bonus token."""
    path: list[int] = []
    if len(tree) and rng.random() < 0.8:
        node = int(rng.integers(0, len(tree)))
        while node >= 0:
            path.insert(0, node)
            node = int(tree.parents[node])
    return Acceptance(path, [int(tree.tokens[i]) for i in path] + [int(rng.integers(0, V))])


# -- masks, positions, the batched cache ------------------------------------------------------------------
def test_batch_inputs_put_each_rows_own_tree_mask_after_its_past():
    rng = np.random.default_rng(0)
    trees = [_random_tree(rng, n) for n in (0, 5, 2, 9)]
    past, roots, width = [0, 7, 3, 7], [4, 5, 6, 7], 7
    ids, mask, positions = batch_inputs(trees, past, roots, width, dtype=torch.float32)
    q = 10
    assert ids.shape == (4, q) and mask.shape == (4, 1, q, width + q) and positions.shape == (4, q)
    allowed = mask[:, 0] == 0
    assert allowed.any(-1).all(), "every query, padded or not, attends to at least one key (no NaN)"
    for b, tree in enumerate(trees):
        n = len(tree) + 1
        alone, pos = attention_inputs(tree, past[b], dtype=torch.float32)  # the row verified alone
        alone = alone[0, 0] == 0  # [n, past + n]
        assert torch.equal(allowed[b, :n, : past[b]], alone[:, : past[b]])
        assert not allowed[b, :, past[b] : width].any(), "the holes after a shorter past are masked"
        assert torch.equal(allowed[b, :n, width : width + n], alone[:, past[b] :])
        assert not allowed[b, :n, width + n :].any(), "no real query sees a padded key"
        for i in range(n, q):  # a padded query sees itself only
            assert allowed[b, i].nonzero().flatten().tolist() == [width + i]
        assert torch.equal(positions[b, :n], pos[0])
        assert ids[b, 0] == roots[b] and ids[b, 1:n].tolist() == tree.tokens.tolist()


@pytest.mark.parametrize("lean", [True, False])
@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_batched_session_equals_one_session_per_row(arch, lean):
    """Random trees and random accepted paths for several steps, rows leaving and joining: the batched
    forward's logits equal those of one TargetSession per row on the model's own forward, step after step
    (KV layout, holes, per-row positions and compaction all checked through the logits they produce), with
    the batch on rasd.lean's forward (Qwen2, Llama) and on the model's."""
    model = tiny_model(arch, vocab_size=V, seed=2)
    rng = np.random.default_rng(1)
    prompts = _prompts(5, seed=4)
    batch = BatchedSession(model, lean=lean)
    assert (batch.lean is not None) == (lean and arch != "gpt2")
    alone: list[TargetSession] = []
    # one row alone, then four joining together: three packed into one prefill, and a single token (nothing
    # to prefill: no pack)
    joint = [prompts[1], prompts[2][:1], prompts[3], prompts[1][::-1]]
    assert [len(g) for g in prefill_packs([len(p) - 1 for p in joint])] == [3]  # a packed forward is tested
    batch.add(prompts[0])
    assert batch.add_many(joint) == [1, 2, 3, 4]
    for p in [prompts[0], *joint]:
        alone.append(TargetSession(model, p, lean=False))
    for step in range(8):
        trees = [_random_tree(rng, int(rng.integers(0, 7))) for _ in alone]
        got = batch.verify(trees)
        accs = []
        for b, (tree, session) in enumerate(zip(trees, alone, strict=True)):
            want = session.verify(tree)
            torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4, msg=f"step {step} row {b}")
            accs.append(_random_acceptance(rng, tree))
            session.commit(accs[-1])
        batch.commit(accs)
        assert batch.past == [s.past_length for s in alone]
        assert batch.cache.get_seq_length() == max(batch.past)
        if step == 3:  # row 1 finishes, a new request joins
            batch.select([0, 2, 3, 4])
            del alone[1]
            batch.add(prompts[4])
            alone.append(TargetSession(model, prompts[4], lean=False))


def test_prefill_packs_fill_first_fit_longest_first_by_hand():
    assert prefill_packs([20, 100, 0, 90], max_tokens=200) == [[1, 3], [0]]  # 190, then 20 fits nowhere
    assert prefill_packs([20, 100, 0, 90], max_tokens=210) == [[1, 3, 0]]
    assert prefill_packs([10, 10, 10]) == [[0, 1, 2]]
    assert prefill_packs([0, 0]) == []
    assert prefill_packs([300, 50, 60, 280], max_tokens=350) == [[0, 1], [3, 2]]  # 60 fits only with 280
    assert prefill_packs([500, 20], max_tokens=100) == [[0], [1]]  # a row longer than a pack is alone
    with pytest.raises(ValueError, match="max_tokens"):
        prefill_packs([3], max_tokens=0)


def test_packed_inputs_are_block_diagonal_causal_by_hand():
    mask, positions = packed_inputs([2, 3, 1], dtype=torch.float32)
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],
        [0, 0, 1, 1, 0, 0],
        [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0]]
    assert mask.min() == torch.finfo(torch.float32).min
    mask, positions = packed_inputs([], dtype=torch.float32)
    assert mask.shape == (1, 1, 0, 0) and positions.shape == (1, 0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lean", [True, False])
def test_prompts_in_several_packs_prefill_as_each_alone(monkeypatch, lean, attn):
    """With packs capped at 40 tokens, five prompts joining together take three packs (two packed, one
    longer than the cap alone) and a one-token prompt none: every row's first verification equals its
    prompt's own session, on rasd.lean's forward and on the model's (sdpa and eager attention)."""
    monkeypatch.setattr("rasd.batch.PACK_TOKENS", 40)
    model = tiny_model("qwen2", vocab_size=V, seed=3, attn_implementation=attn)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, V, size=n).tolist() for n in (30, 12, 55, 1, 20, 9)]
    packs: list[list[int]] = []

    def spy(lengths, max_tokens):
        got = prefill_packs(lengths, max_tokens)
        packs.extend(got)
        return got

    monkeypatch.setattr("rasd.batch.prefill_packs", spy)
    batch = BatchedSession(model, lean=lean)
    assert batch.add_many(prompts) == list(range(6))
    assert packs == [[2], [0, 1], [4, 5]]  # 54 tokens alone; 29 + 11 (= the cap of 40) and 19 + 8
    trees = [_random_tree(rng, int(rng.integers(0, 5))) for _ in prompts]
    got = batch.verify(trees)
    for b, (prompt, tree) in enumerate(zip(prompts, trees, strict=True)):
        want = TargetSession(model, prompt, lean=False).verify(tree)
        torch.testing.assert_close(got[b], want, rtol=1e-4, atol=1e-4, msg=f"row {b}")


# -- the joint planner ------------------------------------------------------------------------------------
def test_choose_width_maximises_the_batchs_rate_by_hand():
    # T(n) = 1 s up to 8 fed tokens, then 0.125 s per token.
    cost = lambda n: max(1.0, n / 8)  # noqa: E731
    confident = np.array([1.0, 1.9, 2.7, 3.4, 4.0])  # gains of 0..4 nodes
    weak = np.array([1.0, 1.1])
    # 2 rows: Q=1 -> 2/1; Q=2 -> 3.0/1; Q=3 -> 3.8/1; Q=4 -> 4.5/1; Q=5 -> 5.1/1.25 = 4.08.
    assert choose_width([confident, weak], cost) == 4
    # Drafting already cost 1 s: Q=4 -> 4.5/2 = 2.25, Q=5 -> 5.1/2.25 = 2.27: the wider tree now pays.
    assert choose_width([confident, weak], cost, sunk_seconds=1.0) == 5
    assert choose_width([confident, weak], cost, max_width=2) == 2
    assert choose_width([np.array([1.0])] * 3, cost) == 1  # nothing proposed: a plain decode step


def test_plan_batch_fills_every_row_best_first_up_to_the_width():
    model = AcceptanceModel()
    strong = TokenTree.chain([5, 6, 7, 8, 9], Source.PROMPT, scores=[0.95] * 5)
    weak = TokenTree([3, 4], [-1, -1], sources=[int(Source.PROMPT)] * 2, scores=[0.02, 0.3])
    flat = lambda n: 1.0  # noqa: E731  every width costs the same: all nodes pay
    trees, q = plan_batch([strong, weak, TokenTree.empty()], [model] * 3, flat)
    assert q == 6 and [len(t) for t in trees] == [5, 2, 0]
    trees, q = plan_batch([strong, weak], [model] * 2, flat, max_nodes=3)
    assert q == 4 and [len(t) for t in trees] == [3, 2]
    steep = lambda n: float(n)  # noqa: E731  every fed token costs a forward: only the root pays
    assert plan_batch([strong, weak], [model] * 2, steep)[1] == 1


# -- greedy: every row equals HF generate on that row alone ----------------------------------------------
@pytest.fixture(scope="module")
def tiny_pair():
    target = tiny_model("llama", vocab_size=V, seed=1)
    draft = tiny_model("llama", vocab_size=V, seed=1, hidden_size=32)
    store = Datastore(vocab_size=V)
    for ids in _prompts(40, seed=7)[1:]:
        store.add(ids)
    for ids in _prompts(6, seed=3)[::2]:  # the corpus knows how some of the test prompts go on
        store.add(ids + _hf_alone(target, ids, 30, eos_token_id=None))
    return target, draft, store


@pytest.mark.parametrize("kind", ["pld_recycling", "corpus", "fused_draft", "no_planner"])
def test_batched_greedy_equals_hf_on_each_row_alone(tiny_pair, kind):
    target, draft, store = tiny_pair
    always = DraftTreeConfig(skip_unprofitable=False)  # a tiny target is as cheap as its draft: force it
    kwargs = {
        "pld_recycling": {"prompt_lookup": True, "recycling": True},
        "corpus": {"datastore": store, "prompt_lookup": False},
        "fused_draft": {"draft": draft, "datastore": store, "prompt_lookup": True, "draft_config": always},
        "no_planner": {"prompt_lookup": True, "recycling": True, "planner": None, "max_tree_nodes": 6},
    }[kind]
    gen = SpeculativeGenerator(target, fast_path=False, **kwargs)
    prompts = _prompts(6, seed=3)
    eos = _hf_alone(target, prompts[2], 24, eos_token_id=None)[20]  # stops some rows early
    ids, mask = _left_padded(prompts)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0)
    stats = out.stats
    assert isinstance(stats, BatchStats)
    width = ids.shape[1]
    for b, p in enumerate(prompts):
        ref = _hf_alone(target, p, 30, eos_token_id=eos, pad_token_id=0)
        assert out.sequences[b, :width].tolist() == ids[b].tolist(), "the input row comes back as given"
        assert out.sequences[b, width : width + len(ref)].tolist() == ref, f"row {b}"
        assert (out.sequences[b, width + len(ref) :] == 0).all()
    # One forward per step for every row in flight; rows that finish leave the batch.
    assert stats.steps == len(stats.batch_rows) < sum(map(len, stats.batch_rows))
    assert len(stats.batch_rows[0]) == 6 and len(stats.batch_rows[-1]) < 6
    assert stats.new_tokens - stats.row_steps > 0, "the drafters did speculate"
    assert all(max(f) <= w for f, w in zip(stats.fed_tokens, stats.widths, strict=True))
    assert any(len(set(f)) > 1 for f in stats.fed_tokens), "rows got different tree sizes"
    if gen.planner is not None:  # the rows taught the planner's shared table and path calibration
        learned = gen.planner.acceptance
        assert learned.tested.sum() > 0 and learned.path_predicted.sum() > 0
    # The row-by-row loop stays available and agrees.
    rows = gen.generate(
        ids, attention_mask=mask, max_new_tokens=30, eos_token_id=eos, pad_token_id=0, batch=False
    )
    assert torch.equal(rows.sequences, out.sequences) and type(rows.stats) is not BatchStats


def test_serve_lets_requests_join_as_rows_finish(tiny_pair):
    target, _, _ = tiny_pair
    batched = BatchedGenerator(SpeculativeGenerator(target, recycling=True, fast_path=False))
    prompts = _prompts(5, seed=8)
    stats = BatchStats()
    finished = []
    for request, tokens in batched.serve(
        iter(prompts), max_batch=2, max_new_tokens=12, eos_token_id=[], stats=stats
    ):
        finished.append(request)
        assert tokens == _hf_alone(target, prompts[request], 12, eos_token_id=None), request
    assert sorted(finished) == list(range(5))
    assert max(map(len, stats.batch_rows)) == 2
    joined_late = [rows for rows in stats.batch_rows if 4 in rows]
    assert joined_late and stats.batch_rows[0] == (0, 1)


def test_every_rows_drafter_is_told_every_committed_token(tiny_pair):
    """Row drafters see every committed token but the last step's, as a lone request's do."""
    from rasd.drafting import Proposal

    class Recorder:
        def begin(self, context):
            self.seen = list(context.prompt)

        def propose(self, budget):
            return Proposal.empty()  # one token per step: all but the last step's reach advance

        def advance(self, step):
            self.seen.extend(step.tokens)

    target, _, _ = tiny_pair
    recorders: list[Recorder] = []
    batched = BatchedGenerator(
        SpeculativeGenerator(target, fast_path=False),
        drafter_factory=lambda: recorders.append(Recorder()) or recorders[-1],
    )
    prompts = _prompts(2, seed=10)
    got = dict(batched.serve(iter(prompts), max_batch=2, max_new_tokens=6, eos_token_id=[]))
    assert sorted(r.seen for r in recorders) == sorted(prompts[b] + got[b][:-1] for b in got)


def test_a_deferred_draft_prefill_in_the_batch_keeps_every_row_and_is_reported(tiny_pair, monkeypatch):
    """Row drafters whose draft model joins after some retrieval-only steps (forced here): every row stays
    token-identical and the stats report when each row's draft prefilled."""
    from rasd.drafting import DraftModel

    target, draft, store = tiny_pair
    monkeypatch.setattr(DraftModel, "_decide", lambda self, context, probe: "probe" if probe else "run")
    monkeypatch.setattr(DraftModel, "_probe_pays", lambda self, now: self._generated >= 4)
    gen = SpeculativeGenerator(target, draft=draft, datastore=store, prompt_lookup=True, fast_path=False)
    prompts = _prompts(3, seed=11)
    stats = BatchStats()
    got = dict(
        BatchedGenerator(gen).serve(
            iter(prompts), max_batch=3, max_new_tokens=16, eos_token_id=[], stats=stats
        )
    )
    assert got == {b: _hf_alone(target, p, 16, eos_token_id=None) for b, p in enumerate(prompts)}
    assert len(stats.draft_prefill_after) == 3 and min(stats.draft_prefill_after) >= 4
    assert stats.draft_decisions == ["probe"] * 3
    assert stats.drafted_steps > 0


def test_batch_errors_and_the_auto_choice(tiny_pair):
    target, _, _ = tiny_pair
    ids, mask = _left_padded(_prompts(3, seed=1))
    gen = SpeculativeGenerator(target, fast_path=False)
    with pytest.raises(ValueError, match="batch must be"):
        gen.generate(ids, attention_mask=mask, batch="yes")
    custom = SpeculativeGenerator(target, StaticTreeDrafter(lambda c: TokenTree([5], [-1])), fast_path=False)
    with pytest.raises(ValueError, match="drafter_factory"):
        custom.generate(ids, attention_mask=mask, max_new_tokens=4, batch=True)
    # "auto" with a custom drafter instance decodes row by row.
    assert type(custom.generate(ids, attention_mask=mask, max_new_tokens=4).stats) is not BatchStats
    batched = BatchedGenerator(
        custom, drafter_factory=lambda: StaticTreeDrafter(lambda c: TokenTree([5], [-1]))
    )
    assert isinstance(batched.generate(ids, attention_mask=mask, max_new_tokens=4).stats, BatchStats)
    with pytest.raises(ValueError, match="max_batch"):
        next(batched.serve([[3, 4]], max_batch=0))
    with pytest.raises(ValueError, match="no unmasked token"):
        batched.generate(ids, attention_mask=torch.zeros_like(mask))


# -- sampling: every row follows the target's own law -----------------------------------------------------
def test_batched_sampling_follows_the_target_on_every_row():
    """Rows of two prompts of different lengths in one batch (left padding, holes in the cache), each with
    a mixed tree of deterministic candidates: the joint law of each row's first two sampled tokens equals the
    tiny model's own p(t1) p(t2 | t1) for that prompt (chi-square)."""
    v = 8
    model = tiny_model("llama", vocab_size=v, init_std=0.5, seed=5)
    prompts = [[2, 5, 3, 1, 6, 2, 5], [4, 1, 7]]
    laws = []
    with torch.no_grad():
        for p in prompts:
            x = torch.tensor([p])
            p1 = torch.softmax(model(x).logits[0, -1], -1)
            both = torch.cat([x.repeat(v, 1), torch.arange(v)[:, None]], 1)
            p2 = torch.softmax(model(both).logits[:, -1], -1)
            laws.append((p1[:, None] * p2).flatten().double().numpy())

    def trees(committed):  # two levels of deterministic candidates; the second prompt's rows get fewer
        return (
            TokenTree([1, 4, 0, 6, 2, 5], [-1, -1, 0, 0, 1, 1])
            if len(committed) > 5
            else TokenTree([3], [-1])
        )

    base = SpeculativeGenerator(model, planner=None, fast_path=False)
    batched = BatchedGenerator(base, drafter_factory=lambda: StaticTreeDrafter(trees))
    ids, mask = _left_padded([prompts[0], prompts[1], prompts[0], prompts[1]])
    g = torch.Generator().manual_seed(0)
    counts = [np.zeros(v * v), np.zeros(v * v)]
    for _ in range(500):
        out = batched.generate(
            ids, attention_mask=mask, max_new_tokens=2, do_sample=True, top_k=0, eos_token_id=[], generator=g
        )
        for b in range(4):
            t1, t2 = out.sequences[b, -2:].tolist()
            counts[b % 2][t1 * v + t2] += 1
    for c, law in zip(counts, laws, strict=True):
        assert _chi_square_pvalue(c, law) > 1e-3


# -- a real model -----------------------------------------------------------------------------------------
@pytest.mark.real_model
def test_batched_greedy_equals_hf_alone_on_real_prompts(smollm2):
    """SmolLM2-135M (grouped KV heads), 6 real held-out prompts of the four families, left padded as HF
    users pass them: every row token-identical to HF ``generate`` on that row alone."""
    model, tok = smollm2
    prompts = [p.render(tok)[-320:] for f in tasks.FAMILIES for p in tasks.prompts(f, "test", 2)][:6]
    gen = SpeculativeGenerator(model, prompt_lookup=True, recycling=True, tokenizer=tok)
    ids, mask = _left_padded(prompts, pad=tok.pad_token_id or 0)
    out = gen.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False)
    width = ids.shape[1]
    for b, p in enumerate(prompts):
        ref = _hf_alone(model, p, 24)
        assert out.sequences[b, width : width + len(ref)].tolist() == ref, f"row {b}"
    assert out.stats.tokens_per_row_step > 1.2, out.stats.to_dict()
