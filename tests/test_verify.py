"""Tree verification: greedy exactness under arbitrary trees, KV compaction, lossless sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as scipy_stats

from rasd import tasks
from rasd.drafting import StaticTreeDrafter
from rasd.generate import SpeculativeGenerator
from rasd.testing import tiny_model
from rasd.tree import Source, TokenTree
from rasd.verify import SamplingConfig, TargetSession, accept_greedy, accept_sampling

# ----------------------------------------------------------------------------------------------
# Arbitrary trees: random, adversarial, empty, and trees full of right and wrong tokens
# ----------------------------------------------------------------------------------------------


class TreeZoo:
    """Cycles through tree kinds. ``reference`` is the plain greedy continuation, so trees can plant
    right tokens (an oracle) next to wrong ones (near misses, duplicates, deep and wide junk)."""

    KINDS = ("empty", "random", "oracle_chain", "near_miss", "wide", "deep_junk", "duplicates", "mixed")

    def __init__(self, reference: list[int], prompt_len: int, vocab: int, seed: int = 0) -> None:
        self.reference = reference
        self.prompt_len = prompt_len
        self.vocab = vocab
        self.rng = np.random.default_rng(seed)
        self.step = 0

    def __call__(self, committed: list[int]) -> TokenTree:
        pos = len(committed) - self.prompt_len
        truth = self.reference[pos : pos + 12]
        kind = self.KINDS[self.step % len(self.KINDS)]
        self.step += 1
        rng, vocab = self.rng, self.vocab
        tokens: list[int] = []
        parents: list[int] = []

        def add(token: int, parent: int) -> int:
            tokens.append(int(token))
            parents.append(parent)
            return len(tokens) - 1

        def chain(seq, parent=-1):
            for t in seq:
                parent = add(t, parent)
            return parent

        if kind == "random":
            for i in range(int(rng.integers(1, 20))):
                add(rng.integers(0, vocab), int(rng.integers(-1, i)))
        elif kind == "oracle_chain":
            chain(truth[: int(rng.integers(1, 12))])
        elif kind == "near_miss":  # right tokens, then a wrong one, then right ones again
            k = int(rng.integers(1, 6))
            wrong = (truth[k] + 1) % vocab if len(truth) > k else 0
            chain([*truth[:k], wrong, *truth[k + 1 : k + 4]])
        elif kind == "wide":  # many wrong siblings, the right one last
            for _ in range(20):
                add(rng.integers(0, vocab), -1)
            chain(truth[:3])
        elif kind == "deep_junk":
            chain(rng.integers(0, vocab, 30))
        elif kind == "duplicates":  # the same token twice under one parent, both subtrees different
            if truth:
                a = add(truth[0], -1)
                b = add(truth[0], -1)
                chain(rng.integers(0, vocab, 3), a)
                chain(truth[1:5], b)
        elif kind == "mixed":
            for i in range(int(rng.integers(1, 10))):
                add(rng.integers(0, vocab), int(rng.integers(-1, i)))
            node = -1
            for t in truth[:6]:
                node = add(t, node)
                add(rng.integers(0, vocab), node)
        return TokenTree(tokens, parents, sources=np.full(len(tokens), int(Source.CORPUS), np.uint8))


def _speculative_greedy(model, prompt_ids, max_new, reference, vocab, seed=0, **gen_kwargs):
    zoo = TreeZoo(reference, len(prompt_ids), vocab, seed)
    generator = SpeculativeGenerator(model, StaticTreeDrafter(zoo))
    out = generator.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new, do_sample=False, **gen_kwargs
    )
    return out.sequences[0, len(prompt_ids) :].tolist(), out.stats


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_greedy_exact_on_tiny_models(arch, attn):
    model = tiny_model(arch, attn_implementation=attn)
    gen = torch.Generator().manual_seed(1)
    for trial in range(3):
        prompt = torch.randint(2, 96, (int(torch.randint(1, 20, (), generator=gen)),), generator=gen).tolist()
        ref = model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False, eos_token_id=None)
        ref = ref[0, len(prompt) :].tolist()
        got, stats = _speculative_greedy(model, prompt, 48, ref, 96, seed=trial, eos_token_id=[])
        assert got == ref
        assert stats.steps < 48  # oracle trees made some steps commit several tokens


def test_greedy_exact_long_generation_tiny():
    """256 new tokens: a KV-compaction error anywhere would surface as a divergence."""
    model = tiny_model("qwen2", vocab_size=64, init_std=0.3)
    prompt = list(range(5, 25))
    ref = model.generate(torch.tensor([prompt]), max_new_tokens=256, do_sample=False, eos_token_id=None)
    ref = ref[0, len(prompt) :].tolist()
    generator = SpeculativeGenerator(model, StaticTreeDrafter(TreeZoo(ref, len(prompt), 64)))
    out = generator.generate(torch.tensor([prompt]), max_new_tokens=256, eos_token_id=[])
    assert out.sequences[0, len(prompt) :].tolist() == ref


def test_kv_compaction_equals_fresh_prefill():
    model = tiny_model("llama")
    prompt = torch.arange(3, 15)
    session = TargetSession(model, prompt)
    committed = prompt.tolist()
    tree = TokenTree([7, 8, 9, 10, 11, 12], [-1, -1, 1, 2, 1, 4])
    logits = session.verify(tree)
    # Force an acceptance of a non-prefix path (nodes 1 -> 4 -> 5) to exercise the gather.
    from rasd.verify import Acceptance

    acc = Acceptance([1, 4, 5], [8, 11, 12, int(logits[6].argmax())])
    session.commit(acc)
    committed += [8, 11, 12]
    fresh = TargetSession(model, torch.tensor([*committed, acc.bonus]))
    assert session.past_length == fresh.past_length == len(committed)
    for mine, theirs in zip(session.cache.layers, fresh.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mine.values, theirs.values, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_scored_root_is_the_first_step_without_a_forward(arch):
    """``score_root=True``: one prefill forward leaves the session where ``verify(empty tree)`` would, with
    the same root logits and cache, and the generator's first token costs no further forward (so
    ``max_new_tokens=1`` runs the target once, as HF ``generate`` does)."""
    model = tiny_model(arch)
    prompt = torch.arange(3, 15)
    plain = TargetSession(model, prompt)
    expected = plain.verify(TokenTree.empty())
    scored = TargetSession(model, prompt, score_root=True)
    assert scored.root_logits is not None and scored.root_logits.shape == expected.shape
    torch.testing.assert_close(scored.root_logits, expected, rtol=1e-5, atol=1e-5)
    assert scored.past_length == plain.past_length == prompt.numel() - 1
    for mine, theirs in zip(scored.cache.layers, plain.cache.layers, strict=True):
        torch.testing.assert_close(mine.keys, theirs.keys, rtol=1e-5, atol=1e-5)
    acc = accept_greedy(TokenTree.empty(), scored.root_logits)
    scored.commit(acc)
    assert scored.past_length == prompt.numel() and scored.root == int(expected[0].argmax())

    calls: list[int] = []
    # (on the embeddings: every forward, the model's own or rasd.lean's, calls them once)
    hook = model.get_input_embeddings().register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        gen = SpeculativeGenerator(
            model, drafter=StaticTreeDrafter(lambda tokens: TokenTree([5], [-1])), planner=None
        )
        out = gen.generate(prompt[None], max_new_tokens=1, do_sample=False)
    finally:
        hook.remove()
    ref = model.generate(prompt[None], max_new_tokens=1, do_sample=False)
    assert out.sequences.tolist() == ref.tolist()
    assert len(calls) == 1 and out.stats.steps == 1 and out.stats.tree_sizes == [0]


def _real_prompts(tokenizer, n_code, n_chat, n_docs):
    picked = (
        tasks.prompts("code", "test", n_code)
        + [p for p in tasks.prompts("chat", "test", 3 * n_chat) if p.id.startswith("mtbench")][:n_chat]
        + tasks.prompts("docqa", "test", n_docs)
    )
    return [(p.id, p.render(tokenizer)) for p in picked]


def _check_real_model(model, tokenizer, prompts, max_new):
    vocab = model.config.vocab_size
    mismatches = []
    for pid, ids in prompts:
        ref = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
        ref = ref[0, len(ids) :].tolist()
        got, _ = _speculative_greedy(model, ids, max_new, ref, vocab, seed=len(ids))
        if got != ref:
            mismatches.append(pid)
    assert not mismatches, f"speculative output differs from generate() on {mismatches}"


@pytest.mark.real_model
def test_greedy_exact_smollm2_50_prompts(smollm2):
    model, tokenizer = smollm2
    prompts = _real_prompts(tokenizer, n_code=20, n_chat=15, n_docs=15)
    assert len(prompts) == 50
    _check_real_model(model, tokenizer, prompts, max_new=24)


@pytest.mark.real_model
def test_greedy_exact_smollm2_long(smollm2):
    model, tokenizer = smollm2
    _check_real_model(model, tokenizer, _real_prompts(tokenizer, 1, 1, 0), max_new=256)


QWEN_QUICK = {"n_code": 5, "n_chat": 4, "n_docs": 3}  # without -m slow: 12 prompts
# With the slow test: 24 distinct prompts (SmolLM2 runs 50 above; each Qwen prompt costs ~12 s here, most
# of it HF's own reference generate, so 50 would cost CI another 5 minutes for the same code paths).
QWEN_ALL = {"n_code": 10, "n_chat": 8, "n_docs": 6}


@pytest.mark.real_model
def test_greedy_exact_qwen_draft_model(qwen_draft):
    model, tokenizer = qwen_draft
    _check_real_model(model, tokenizer, _real_prompts(tokenizer, **QWEN_QUICK), max_new=32)


@pytest.mark.real_model
@pytest.mark.slow
def test_greedy_exact_qwen_50_prompts_and_long(qwen_draft):
    """The other 12 of 24 real prompts (the quick test above covers the first 12), then a 256-token run (a
    KV-compaction error anywhere in a long answer surfaces as a divergence; SmolLM2's long test runs two)."""
    model, tokenizer = qwen_draft
    quick = {pid for pid, _ in _real_prompts(tokenizer, **QWEN_QUICK)}
    every = _real_prompts(tokenizer, **QWEN_ALL)
    assert len({pid for pid, _ in every}) == 24 and quick <= {pid for pid, _ in every}
    _check_real_model(model, tokenizer, [(pid, ids) for pid, ids in every if pid not in quick], max_new=32)
    _check_real_model(model, tokenizer, _real_prompts(tokenizer, 1, 0, 0), max_new=256)


# ----------------------------------------------------------------------------------------------
# Sampling: the target's distribution, exactly
# ----------------------------------------------------------------------------------------------


@pytest.mark.real_model
def test_sampling_config_matches_hf_generate_scores(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    for kwargs in ({}, {"temperature": 0.7, "top_k": 20, "top_p": 0.9}, {"top_k": 0, "min_p": 0.05}):
        out = model.generate(
            ids,
            max_new_tokens=1,
            do_sample=True,
            output_scores=True,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        hf = torch.softmax(out.scores[0][0].float(), -1)
        ours = SamplingConfig.resolve(model, do_sample=True, **kwargs).probs(out.logits[0])[0]
        torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-7)
    # HF samples with top_k=50 when nothing says otherwise; so must we.
    assert SamplingConfig.resolve(model, do_sample=True).top_k == 50


def _chi_square_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    probs = np.asarray(probs, dtype=np.float64)
    probs = probs / probs.sum()  # float32 probabilities sum to 1 only up to rounding
    keep = probs * counts.sum() >= 5  # pool cells with small expectations
    obs = np.append(counts[keep], counts[~keep].sum())
    exp = np.append(probs[keep], probs[~keep].sum()) * counts.sum()
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    return float(scipy_stats.chisquare(obs, exp).pvalue)


V = 8


def _draw_without_replacement(q: torch.Tensor, k: int, gen: torch.Generator) -> list[int]:
    q = q.clone()
    out = []
    for _ in range(k):
        x = int(torch.multinomial(q / q.sum(), 1, generator=gen))
        out.append(x)
        q[x] = 0
    return out


def _first_token_counts(tree_fn, logits, trials, seed=0, config=None):
    config = config or SamplingConfig(do_sample=True)
    gen = torch.Generator().manual_seed(seed)
    counts = np.zeros(V)
    for _ in range(trials):
        tree = tree_fn(gen)
        acc = accept_sampling(tree, logits[: len(tree) + 1], config, gen)
        counts[acc.tokens[0]] += 1
    return counts


def _logits(seed):
    return torch.randn(40, V, generator=torch.Generator().manual_seed(seed)) * 1.5


def _tree_chain(gen):  # deterministic chain (retrieval)
    return TokenTree([2, 5, 1], [-1, 0, 1])


def _tree_multi(gen):  # several deterministic candidates per node
    return TokenTree([3, 0, 6, 1, 4, 2], [-1, -1, -1, 0, 0, 1])


Q = torch.softmax(torch.randn(V, generator=torch.Generator().manual_seed(99)), -1)


def _tree_mixed(gen):  # two children sampled from q (without replacement) + deterministic ones after them
    sampled = _draw_without_replacement(Q, 2, gen)
    det = [t for t in (0, 7) if t not in sampled]
    tokens = sampled + det
    q_rows = [0, 0] + [-1] * len(det)
    return TokenTree(tokens, [-1] * len(tokens), q_rows=q_rows, q_dists=Q[None])


@pytest.mark.parametrize("tree_fn", [_tree_chain, _tree_multi, _tree_mixed], ids=["chain", "multi", "mixed"])
def test_speculative_sampling_first_token_matches_target(tree_fn):
    logits = _logits(1)
    config = SamplingConfig(do_sample=True, temperature=0.8, top_k=6)
    target = config.probs(logits[:1])[0].numpy()
    counts = _first_token_counts(tree_fn, logits, 6000, config=config)
    assert _chi_square_pvalue(counts, target) > 1e-3


def test_trimming_a_sampled_draft_tree_keeps_the_target_distribution():
    """A draft model's sampled trees (3 draws per fed node, 15 nodes) trimmed to 10 nodes in best-first
    order: the first token still follows the target. Cutting draws by their own estimates (what a trim
    without ``sampled_closure`` does) gives p ~ 1e-11 here."""
    from rasd.drafting.base import DraftContext, StepBudget
    from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
    from rasd.planner import AcceptanceModel
    from rasd.tree import best_first_order, keep_first

    v = 12
    target = tiny_model("llama", vocab_size=v, init_std=0.5, seed=3)
    draft = tiny_model("llama", vocab_size=v, init_std=0.5, seed=4)
    prompt = (2, 5, 3, 2, 5, 3, 2, 5, 0)
    config = SamplingConfig.resolve(target, do_sample=True, top_k=0)
    with torch.no_grad():
        root = target(torch.tensor([prompt])).logits[0, -1:]
    drafter = DraftModel(
        draft, config=DraftTreeConfig(top_k=3, beam=2, max_depth=2, seed_feed=0), fast_path=False
    )
    gen = torch.Generator().manual_seed(1)
    counts = np.zeros(v)
    trimmed = 0
    for _ in range(2500):
        drafter.begin(DraftContext(prompt, config, gen, 4, None))
        tree = drafter.propose(StepBudget(64, None)).tree
        cut = keep_first(tree, best_first_order(tree.parents, AcceptanceModel().path_probs(tree)), 10)
        trimmed += len(cut) < len(tree)
        # Only the root's row matters for the first token; deeper rows are never reached by it.
        counts[accept_sampling(cut, root.repeat(len(cut) + 1, 1), config, gen).tokens[0]] += 1
    assert _chi_square_pvalue(counts, config.probs(root)[0].numpy()) > 1e-3
    assert trimmed == 0  # every node of these trees is sampled: nothing may be cut


def test_a_wrong_residual_update_is_detected(monkeypatch):
    """Guard against a test that cannot fail: without the residual update the same check must reject."""
    logits = _logits(2)
    target = SamplingConfig(do_sample=True).probs(logits[:1])[0].numpy()
    import rasd.verify as verify

    monkeypatch.setattr(verify, "_residual_after_rejection", lambda residual, x, q: residual)
    wrong = _first_token_counts(_tree_multi, logits, 6000)
    assert _chi_square_pvalue(wrong, target) < 1e-6


def test_an_exhausted_residual_samples_the_bonus_from_the_last_one(monkeypatch):
    """Rounding can leave a residual with nothing in it (only where the rejected child should have been
    accepted with probability 1); acceptance must still return a token drawn from the last residual."""
    import rasd.verify as verify

    monkeypatch.setattr(verify, "_residual_after_rejection", lambda residual, x, q: None)
    logits = torch.full((3, 8), -5.0)
    logits[0, 4] = 5.0  # the root's distribution puts almost everything on token 4
    tree = TokenTree([2, 3], [-1, -1])  # both children are wrong: the first rejection exhausts
    gen = torch.Generator().manual_seed(0)
    bonus = [accept_sampling(tree, logits, SamplingConfig(do_sample=True), gen).bonus for _ in range(200)]
    assert set(bonus) <= set(range(8)) and bonus.count(4) > 150


def test_skipping_the_deterministic_residual_is_detected():
    logits = _logits(3)
    target = SamplingConfig(do_sample=True).probs(logits[:1])[0].numpy()
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(V)
    children = [3, 0, 6]
    for _ in range(6000):  # naive (wrong) scheme: test each child against the *unchanged* target p
        p = target
        x = next((c for c in children if float(torch.rand((), generator=gen)) < p[c]), None)
        if x is None:
            x = int(torch.multinomial(torch.tensor(p), 1, generator=gen))
        counts[x] += 1
    assert _chi_square_pvalue(counts, target) < 1e-6


def test_sampling_end_to_end_two_token_distribution():
    """Through the whole loop (tree forward, acceptance, KV compaction), the joint distribution of the first
    two sampled tokens equals the tiny model's own p(t1) * p(t2 | t1)."""
    model = tiny_model("llama", vocab_size=V, init_std=0.5)
    prompt = torch.tensor([[2, 5, 3, 1, 6]])
    with torch.no_grad():
        p1 = torch.softmax(model(prompt).logits[0, -1], -1)
        both = torch.cat([prompt.repeat(V, 1), torch.arange(V)[:, None]], 1)
        p2 = torch.softmax(model(both).logits[:, -1], -1)
    joint = (p1[:, None] * p2).flatten().numpy()

    def trees(committed):  # a fixed mixed tree of deterministic candidates, two levels deep
        return TokenTree([1, 4, 0, 6, 2, 5], [-1, -1, 0, 0, 1, 1])

    generator = SpeculativeGenerator(model, StaticTreeDrafter(trees), fast_path=False)
    counts = np.zeros(V * V)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3000):
        out = generator.generate(
            prompt, max_new_tokens=2, do_sample=True, top_k=0, eos_token_id=[], generator=gen
        )
        t1, t2 = out.sequences[0, -2:].tolist()
        counts[t1 * V + t2] += 1
    assert _chi_square_pvalue(counts, joint) > 1e-3


def test_seeded_sampling_is_reproducible():
    model = tiny_model("qwen2")
    # No planner: with one, the trees verified follow measured timings and what the first call taught it
    # (the second call verified smaller trees on an AVX-512 Xeon), and a sampled output follows the trees.
    drafter = StaticTreeDrafter(lambda c: TokenTree([5, 6, 7], [-1, 0, -1]))
    generator = SpeculativeGenerator(model, drafter, planner=None)
    runs = [
        generator.generate([3, 4, 5], max_new_tokens=20, do_sample=True, seed=123).sequences for _ in range(2)
    ]
    torch.testing.assert_close(runs[0], runs[1])


# ----------------------------------------------------------------------------------------------
# Bad input and unsupported models
# ----------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_error():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="prompt is empty"):
        TargetSession(model, torch.tensor([], dtype=torch.long))
    with pytest.raises(ValueError, match="outside"):
        TargetSession(model, torch.tensor([3, 500]))
    session = TargetSession(model, torch.tensor([3, 4]))
    with pytest.raises(ValueError, match="vocabulary"):
        session.verify(TokenTree([1000], [-1]))
    with pytest.raises(ValueError, match="empty"):
        SpeculativeGenerator(model).generate(torch.zeros((1, 0), dtype=torch.long))


def test_unsupported_attention_and_sliding_window_are_refused():
    model = tiny_model("qwen2")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation='sdpa' or 'eager'"):
        TargetSession(model, torch.tensor([1, 2]))
    windowed = tiny_model("qwen2")
    windowed.config.layer_types = ["sliding_attention"] * windowed.config.num_hidden_layers
    with pytest.raises(ValueError, match="sliding-window"):
        TargetSession(windowed, torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="causal LM"):
        TargetSession(torch.nn.Linear(2, 2), torch.tensor([1]))


def test_greedy_acceptance_picks_the_matching_child_among_many():
    tree = TokenTree([4, 5, 6, 7], [-1, -1, 1, 1])
    logits = torch.full((5, 10), -1.0)
    logits[0, 5] = 1  # root -> 5 (node 1)
    logits[2, 7] = 1  # node 1 -> 7 (node 3)
    logits[4, 9] = 1  # node 3 -> bonus 9
    acc = accept_greedy(tree, logits)
    assert acc.path == [1, 3] and acc.tokens == [5, 7, 9]


def test_cache_is_passed_under_the_keyword_this_transformers_expects():
    """transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name warns, then goes away in
    5.40); older releases only know ``past_key_values``. Verification and drafting must use whichever the
    installed model accepts, so a newer transformers neither warns nor breaks."""
    import inspect
    import warnings

    from rasd.drafting import DraftContext, DraftModel, StepBudget
    from rasd.verify import with_cache

    class OldStyle(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, use_cache=False):
            return input_ids

    assert with_cache(OldStyle(), "C") == {"past_key_values": "C"}
    model = tiny_model("qwen2")
    expected = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    assert with_cache(model, "C") == {expected: "C"}
    prompt = torch.tensor([[3, 5, 7, 11, 13]])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*past_key_values.*")
        session = TargetSession(model, prompt)
        session.commit(accept_greedy(TokenTree.chain([2, 4]), session.verify(TokenTree.chain([2, 4]))))
        draft = DraftModel(model, fast_path=False)
        draft.begin(DraftContext(tuple(prompt[0].tolist()), SamplingConfig()))
        assert len(draft.propose(StepBudget(8)).tree) > 0
