"""REST's own draftretriever as a drafter (the benchmark's ``rest_native`` contender)."""

import numpy as np
import pytest
import torch

from benchmarks import rest_native
from rasd.drafting import DraftContext, StepBudget
from rasd.generate import SpeculativeGenerator
from rasd.testing import tiny_model
from rasd.tree import Source
from rasd.verify import SamplingConfig

V = 96


def test_paths_to_tree_is_the_trie_of_the_paths_cut_to_budget():
    paths = [[5, 6, -2], [5, 6, 7], [5, 60, 70]]  # draftretriever's shape: -2 pads short paths
    tree = rest_native.paths_to_tree(paths, budget=16, match_length=3)
    assert tree.tokens.tolist() == [5, 6, 7, 60, 70]
    assert tree.parents.tolist() == [-1, 0, 1, 0, 3]
    assert tree.scores.tolist() == [3, 2, 1, 1, 1]  # paths through each node
    assert set(tree.sources.tolist()) == {int(Source.CORPUS)} and set(tree.match_lengths.tolist()) == {3}
    cut = rest_native.paths_to_tree(paths, budget=3)
    assert cut.tokens.tolist() == [5, 6, 7] and cut.parents.tolist() == [-1, 0, 1]
    assert len(rest_native.paths_to_tree([], budget=8)) == 0


@pytest.mark.skipif(not rest_native.available(), reason="REST's draftretriever is not installed")
def test_draftretriever_drafter_matches_reference_and_is_lossless(tmp_path):
    target = tiny_model("llama", vocab_size=V, seed=1)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(2, V, size=int(rng.integers(4, 10))).tolist() for _ in range(8)]
    # A corpus that holds the target's own greedy continuations of half the prompts (retrieval hits),
    # plus random documents (misses and spurious matches).
    docs = []
    for p in prompts[:4]:
        with torch.inference_mode():
            out = target.generate(torch.tensor([p]), max_new_tokens=40, do_sample=False, eos_token_id=None)
        docs.append(out[0].tolist())
    docs += [rng.integers(2, V, size=200).tolist() for _ in range(6)]
    index = rest_native.write_index(docs, tmp_path / "corpus.idx", vocab_size=V)
    assert index.exists() and not list(tmp_path.glob("*.partial"))

    # Proposals are not checked against an exact suffix-match reference: this build of draftretriever
    # also answers with continuations that follow no suffix of the context (seen on this corpus, e.g.
    # [3, 3, 3, 82], which occurs nowhere in it), so only the tree's shape and budget are its contract.
    lookup = rest_native.DraftRetrieverLookup(index)
    lookup.begin(DraftContext(tuple(docs[0][:12]), SamplingConfig()))
    tree = lookup.propose(StepBudget(16)).tree
    assert 0 < len(tree) <= 16 and tree.max_depth >= 1
    assert (
        docs[0][12] in tree.tokens[tree.parents == -1].tolist()
    )  # the corpus's own continuation is among them

    gen = SpeculativeGenerator(target, drafter=rest_native.DraftRetrieverLookup(index), fast_path=False)
    accepted = 0
    for p in prompts:
        x = torch.tensor([p])
        with torch.inference_mode():
            ref = target.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=30, do_sample=False, eos_token_id=None
            )[0, len(p) :].tolist()
        res = gen.generate(p, max_new_tokens=30, do_sample=False, eos_token_id=[])
        assert res.sequences[0, len(p) : len(p) + res.stats.new_tokens].tolist() == ref
        accepted += res.stats.accepted_by_source.get("corpus", 0)
    assert accepted > 0  # the hits were used, not only verified away


def test_draftretriever_drafter_refuses_one_token_spans(tmp_path):
    if not rest_native.available():
        pytest.skip("REST's draftretriever is not installed")
    index = rest_native.write_index([[1, 2, 3, 4]], tmp_path / "c.idx", vocab_size=8)
    with pytest.raises(ValueError, match="one-token"):
        rest_native.DraftRetrieverLookup(index, spans=(4, 1))
