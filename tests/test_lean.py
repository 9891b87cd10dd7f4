"""rasd.lean (draft forwards, target verification) against Hugging Face's forward of the same model."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from rasd.drafting.draft_model import DraftModel, DraftTreeConfig
from rasd.fastpath import FastPath, FastPathConfig
from rasd.lean import LeanCache, LeanDecoder, lean_supported
from rasd.testing import tiny_model
from rasd.tree import TreeBuilder, attention_inputs
from rasd.verify import with_cache


def _hf(model, ids, cache, mask=None, positions=None):
    with torch.inference_mode():
        out = model(
            input_ids=ids[None] if ids.dim() == 1 else ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **with_cache(model, cache),
        )
    return out.logits[0]


def _random_tree(gen: torch.Generator, vocab: int, size: int) -> TreeBuilder:
    nodes = TreeBuilder()
    for _ in range(size):
        parent = int(torch.randint(-1, len(nodes), (1,), generator=gen)) if len(nodes) else -1
        nodes.add(int(torch.randint(2, vocab, (1,), generator=gen)), parent, 0, 0.5, 0.5)
    return nodes


def _check_against_hf(model, vocab: int, seed: int, atol: float = 1e-5) -> None:
    """Prefill, a tree forward with retained slots, a crop, a causal chunk after the cache, and growth past
    the cache's first capacity: the lean logits and cache length follow Hugging Face's at every step."""
    gen = torch.Generator().manual_seed(seed)
    lean = LeanDecoder(model)
    ref, mine = DynamicCache(config=model.config), lean.new_cache()
    prompt = torch.randint(2, vocab, (int(torch.randint(1, 40, (1,), generator=gen)),), generator=gen)
    torch.testing.assert_close(lean.forward(prompt, mine), _hf(model, prompt, ref), atol=atol, rtol=1e-5)
    for _ in range(6):
        past = ref.get_seq_length()
        nodes = _random_tree(gen, vocab, int(torch.randint(1, 9, (1,), generator=gen)))
        chain = int(torch.randint(1, 4, (1,), generator=gen))
        ids = torch.cat([torch.randint(2, vocab, (chain,), generator=gen), torch.tensor(nodes.tokens)])
        mask, positions = attention_inputs(nodes.build(), past, chain=chain, dtype=torch.float32)
        got = lean.forward(ids.tolist(), mine, mask=mask, positions=positions)
        torch.testing.assert_close(got, _hf(model, ids, ref, mask, positions), atol=atol, rtol=1e-5)
        drop = int(torch.randint(0, len(nodes) + 1, (1,), generator=gen))
        if drop:
            ref.crop(-drop)
            mine.crop(-drop)
        assert mine.get_seq_length() == ref.get_seq_length()
        chunk = torch.randint(2, vocab, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen)
        torch.testing.assert_close(lean.forward(chunk, mine), _hf(model, chunk, ref), atol=atol, rtol=1e-5)
    long = torch.randint(2, vocab, (300,), generator=gen)  # past the first capacity (256): the cache grows
    torch.testing.assert_close(lean.forward(long, mine), _hf(model, long, ref), atol=atol, rtol=1e-5)
    assert mine.get_seq_length() == ref.get_seq_length() > 300


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_lean_forward_equals_hf_forward_on_tiny_models(arch, seed):
    model = tiny_model(arch, seed=seed)
    assert lean_supported(model)
    _check_against_hf(model, model.config.vocab_size, seed)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_lean_forward_batch_equals_each_row_alone(arch):
    """forward_batch over B rows (each its own random tree mask and positions) equals forward on each row
    alone, through a right-padded causal prefill, a cache rebuilt by from_layers with little room (so it
    grows), crops and a row reordering (batch_select_indices)."""
    model = tiny_model(arch, seed=3)
    lean = LeanDecoder(model)
    gen = torch.Generator().manual_seed(3)
    rows = 3
    prompts = torch.randint(2, 96, (rows, 9), generator=gen)
    batch, alone = lean.new_cache(rows), [lean.new_cache() for _ in range(rows)]
    assert lean.forward_batch(prompts, batch, logits="none") is None
    for b in range(rows):
        lean.forward(prompts[b], alone[b], logits="none")
    batch = LeanCache.from_layers([(layer.keys, layer.values) for layer in batch.layers], room=2)
    for step in range(5):
        n, past = int(torch.randint(1, 7, (1,), generator=gen)), batch.get_seq_length()
        masks, positions = zip(
            *(
                attention_inputs(_random_tree(gen, 96, n).build(), past, chain=1, dtype=torch.float32)
                for _ in range(rows)
            ),
            strict=True,
        )
        ids = torch.randint(2, 96, (rows, n + 1), generator=gen)
        got = lean.forward_batch(ids, batch, mask=torch.cat(masks), positions=torch.cat(positions))
        assert got.shape == (rows, n + 1, model.config.vocab_size)
        for b in range(rows):
            want = lean.forward(ids[b], alone[b], mask=masks[b], positions=positions[b])
            torch.testing.assert_close(got[b], want, atol=1e-5, rtol=1e-5, msg=f"step {step} row {b}")
        drop = int(torch.randint(0, n + 1, (1,), generator=gen))
        for cache in (batch, *alone):
            cache.crop(-drop)
        if step == 2:
            batch.batch_select_indices(torch.tensor([2, 0]))
            alone = [alone[2], alone[0]]
            rows = 2
    for mine, theirs in zip(batch.layers, zip(*(c.layers for c in alone), strict=True), strict=True):
        torch.testing.assert_close(mine.keys, torch.cat([t.keys for t in theirs]), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="rows of input"):
        lean.forward_batch(ids[:1], batch)


def test_lean_refuses_what_it_does_not_reproduce():
    gpt2 = tiny_model("gpt2")
    assert not lean_supported(gpt2)
    with pytest.raises(ValueError, match="Qwen2 and Llama"):
        LeanDecoder(gpt2)
    assert DraftModel(gpt2, fast_path=False).lean is None  # the draft falls back to the model's forward
    assert DraftModel(tiny_model("qwen2"), fast_path=False).lean is not None
    assert DraftModel(tiny_model("qwen2"), fast_path=False, config=DraftTreeConfig(lean=False)).lean is None


@pytest.mark.real_model
def test_lean_forward_equals_hf_forward_on_the_real_draft(qwen_draft):
    """The real 0.5B: the same logits as Hugging Face's forward, on fp32 torch and under the int8 fast path
    the draft runs on (both forwards route the same linear layers)."""
    model, _ = qwen_draft
    _check_against_hf(model, 20000, seed=3, atol=1e-4)
    fast = FastPath.for_model(model, FastPathConfig(weights="int8"))
    with fast.active():
        _check_against_hf(model, 20000, seed=4, atol=1e-4)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_target_session_on_lean_forwards_equals_the_model_forward(arch):
    """TargetSession with and without rasd.lean: the same root logits, verification logits and compacted
    cache through random trees and non-prefix acceptances (the gather)."""
    from rasd.tree import TokenTree
    from rasd.verify import Acceptance, TargetSession, accept_greedy

    model = tiny_model(arch, seed=5)
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(2, 96, (23,), generator=gen)
    lean = TargetSession(model, prompt, score_root=True)
    plain = TargetSession(model, prompt, score_root=True, lean=False)
    assert lean.lean is not None and plain.lean is None
    torch.testing.assert_close(lean.root_logits, plain.root_logits, atol=1e-5, rtol=1e-5)
    first = accept_greedy(TokenTree.empty(), plain.root_logits)  # the first token, from the prefill
    lean.commit(first)
    plain.commit(first)
    for _ in range(8):
        tree = _random_tree(gen, 96, int(torch.randint(1, 10, (1,), generator=gen))).build()
        got, expected = lean.verify(tree), plain.verify(tree)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        node = int(torch.randint(0, len(tree), (1,), generator=gen))  # accept the path to a random node
        path = [node]
        while tree.parents[path[-1]] >= 0:
            path.append(int(tree.parents[path[-1]]))
        path.reverse()
        tokens = [int(tree.tokens[i]) for i in path]
        acceptance = Acceptance(path, [*tokens, int(expected[node + 1].argmax())])
        lean.commit(acceptance)
        plain.commit(acceptance)
        assert lean.past_length == plain.past_length and lean.root == plain.root
        for mine, theirs in zip(lean.cache.layers, plain.cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-5)
