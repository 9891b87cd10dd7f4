"""rasd.integrations.vllm: the proposer's own logic (any environment), and the real Qwen2.5-Coder-0.5B in
vLLM on CPU with no speculation, vLLM's ngram and RasdProposer (only where vLLM is installed:
`bash scripts/vllm-env.sh python -m pytest tests/test_vllm.py`)."""

from __future__ import annotations

import gc
import os
from types import SimpleNamespace

import numpy as np
import pytest

import rasd
from rasd.integrations.vllm import RasdProposer, RasdProposerConfig, best_chain


def _config(k: int = 6, max_model_len: int = 512, **rasd_options) -> SimpleNamespace:
    """The parts of vLLM's VllmConfig the proposer reads."""
    return SimpleNamespace(
        additional_config={"rasd": rasd_options},
        speculative_config=SimpleNamespace(num_speculative_tokens=k),
        model_config=SimpleNamespace(max_model_len=max_model_len, tokenizer=None),
    )


def _step(proposer: RasdProposer, rows: list[list[int]]) -> list[list[int]]:
    """One engine step over a batch, in vLLM's layout: a [max_num_reqs, max_model_len] int32 table."""
    table = np.zeros((8, 512), np.int32)
    for i, row in enumerate(rows):
        table[i, : len(row)] = row
    counts = np.array([len(r) for r in rows] + [0] * (8 - len(rows)), np.int32)
    return proposer.propose([[row[-1]] for row in rows], counts, table)


def test_options_are_validated():
    assert RasdProposerConfig.from_vllm({}) == RasdProposerConfig()
    with pytest.raises(ValueError, match="unknown rasd proposer options"):
        RasdProposerConfig.from_vllm({"rasd": {"datastor": "x.rasd"}})
    with pytest.raises(ValueError, match="nothing to propose"):
        RasdProposerConfig(prompt_lookup=False)
    with pytest.raises(ValueError, match="must be >= 1"):
        RasdProposerConfig(min_match=0)


def test_prompt_lookup_continues_the_request_and_caps_the_chain():
    proposer = RasdProposer(_config(k=6))
    text = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    # The row ends with 5 6 7 8, seen before: the chain continues it (9 10 ...), at most k tokens and at most
    # spec_factor x the match length.
    (draft,) = _step(proposer, [[*text, 1, 2, *text[:4]]])
    assert draft == text[4:8]  # match length 4 -> 4 tokens
    (draft,) = _step(proposer, [[*text, 1, 2, *text[:7]]])
    assert draft == [*text[7:], 1, 2, 5]  # match length 7: k = 6 tokens
    short = RasdProposer(_config(k=6, spec_factor=0.5))
    assert _step(short, [[*text, 1, 2, *text[:4]]]) == [text[4:6]]
    assert _step(proposer, [[1, 2, 3, 4]]) == [[]]  # nothing seen before


def test_corpus_and_request_text_compete_by_match_length(tmp_path):
    store = rasd.Datastore(vocab_size=100)
    store.add([40, 41, 42, 43, 44, 45, 46, 47, 48, 49])
    store.save(tmp_path / "c.rasd")
    proposer = RasdProposer(_config(k=4, datastore=str(tmp_path / "c.rasd"), check_tokenizer=False))
    # Only the corpus knows 41 42 43 (match 3: a chain of at most 3).
    assert _step(proposer, [[7, 41, 42, 43]]) == [[44, 45, 46]]
    # The request repeats 42 43 (match 2), the corpus matches 41 42 43 (3): the corpus wins.
    assert _step(proposer, [[42, 43, 9, 41, 42, 43]]) == [[44, 45, 46]]
    # Equal matches (3): the request's own text wins.
    assert _step(proposer, [[41, 42, 43, 9, 41, 42, 43]]) == [[9, 41, 42]]
    assert proposer.proposed == {"corpus": 2, "prompt": 1}


def test_best_chain_follows_the_most_frequent_child():
    tree = rasd.TokenTree(
        np.array([3, 4, 5, 6, 7]), np.array([-1, -1, 0, 0, 2]), scores=np.array([0.6, 0.3, 0.5, 0.2, 0.4])
    )
    assert best_chain(tree, 8) == [3, 5, 7]
    assert best_chain(tree, 2) == [3, 5]
    assert best_chain(rasd.TokenTree.empty(), 4) == []


def test_requests_are_found_again_when_rows_move_and_heads_collide():
    """vLLM passes no request ids and moves requests between rows; a request's automaton must survive
    that (found by its tokens), and requests sharing a long prefix must not be mixed up."""
    proposer = RasdProposer(_config(k=4))
    head = list(range(10, 50))  # a shared 40-token prefix (a chat template, a system prompt)
    a = [*head, 1, 2, 3, 4, 1, 2]
    b = [*head, 7, 8, 9, 7, 8]
    assert _step(proposer, [a, b]) == [[3, 4], [9, 7]]
    states = set(proposer._requests)
    a, b = [*a, 3], [*b, 9]
    assert _step(proposer, [b, a]) == [[7, 8, 9], [4, 1, 2]]  # rows swapped
    assert set(proposer._requests) == states  # the same two automata, grown, not rebuilt
    assert sorted(len(s.tokens) for s in proposer._requests.values()) == sorted([len(a), len(b)])


def test_the_request_cache_is_bounded():
    proposer = RasdProposer(_config(k=4, max_requests=3))
    for n in range(10):
        _step(proposer, [[n, 1, 2, 3, 1, 2]])
    assert len(proposer._requests) == 3 and len(proposer._by_row) <= 1
    assert sum(len(v) for v in proposer._by_head.values()) == 3


def test_ids_outside_the_datastore_vocabulary_do_not_fail(tmp_path):
    store = rasd.Datastore(vocab_size=50)
    store.add([10, 11, 12, 13, 14])
    store.save(tmp_path / "c.rasd")
    proposer = RasdProposer(
        _config(k=3, datastore=str(tmp_path / "c.rasd"), check_tokenizer=False, prompt_lookup=False)
    )
    # 99 (a padded-vocabulary id) restarts the corpus match: 11 12 -> 13 14.
    assert _step(proposer, [[10, 11, 12, 99, 11, 12]]) == [[13, 14]]


# -- the real engine ---------------------------------------------------------------------------------------
def _spec_counts(llm) -> dict[str, int]:
    from vllm.v1.metrics.reader import Counter

    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    out = dict.fromkeys(names, 0)
    for metric in llm.get_metrics():
        for name in names:
            if isinstance(metric, Counter) and metric.name == f"vllm:spec_decode_{name}":
                out[name] += metric.value
    return out


@pytest.fixture(scope="module")
def engine_inputs(tmp_path_factory):
    """Real prompts (2 HumanEval, 2 documentation QA from rasd.tasks' test split) and a datastore of the
    standard library and the documentation pages, for Qwen2.5-Coder-0.5B."""
    pytest.importorskip("vllm")
    from rasd import models, tasks
    from rasd.datastore import corpus_documents

    tok = models.load_tokenizer("qwen2.5-coder-0.5b")
    prompts = tasks.prompts("code", "test", 2) + tasks.prompts("docqa", "test", 2)
    pages = {p.id for p in prompts}
    docs = [d for d in corpus_documents("python-docs") if d[0] in pages]
    docs += list(corpus_documents("stdlib", 300))
    path = tmp_path_factory.mktemp("vllm") / "corpus.rasd"
    rasd.build_datastore(docs, tok, path, progress=False)
    return models.ensure_model("qwen2.5-coder-0.5b"), [p.render(tok) for p in prompts], path


def _generate(model_dir, prompts, speculative_config=None, additional_config=None):
    from vllm import LLM, SamplingParams

    # A small KV cache: four requests of ~1k tokens need far less than vLLM's default 4 GiB.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    llm = LLM(
        model=str(model_dir),
        dtype="float32",
        enforce_eager=True,
        max_model_len=2048,
        max_num_seqs=4,
        seed=0,
        disable_log_stats=False,
        speculative_config=speculative_config,
        additional_config=additional_config or {},
    )
    try:
        # use_tqdm=False: under TQDM_DISABLE=1 (.ci/run) vLLM 0.32 divides by the disabled bar's elapsed 0
        outs = llm.generate(
            [{"prompt_token_ids": p} for p in prompts],
            SamplingParams(temperature=0.0, max_tokens=40),
            use_tqdm=False,
        )
        return [list(o.outputs[0].token_ids) for o in outs], _spec_counts(llm)
    finally:
        del llm
        gc.collect()


@pytest.mark.real_model
@pytest.mark.slow
def test_vllm_greedy_output_is_identical_and_rasd_drafts_are_accepted(engine_inputs):
    model_dir, prompts, corpus = engine_inputs
    plain, _ = _generate(model_dir, prompts)
    ngram, ngram_counts = _generate(
        model_dir,
        prompts,
        {"method": "ngram", "num_speculative_tokens": 6, "prompt_lookup_min": 2, "prompt_lookup_max": 4},
    )
    ours, counts = _generate(
        model_dir,
        prompts,
        {
            "method": "custom_class",
            "model": "rasd.integrations.vllm.RasdProposer",
            "num_speculative_tokens": 6,
        },
        {"rasd": {"datastore": str(corpus)}},
    )
    assert ngram == plain
    assert ours == plain
    assert ngram_counts["num_drafts"] > 0
    assert counts["num_draft_tokens"] > 0 and counts["num_accepted_tokens"] > 0
    # Document QA copies from the page the corpus holds: a fair share of the drafts must be right.
    assert counts["num_accepted_tokens"] >= 0.2 * counts["num_draft_tokens"]
