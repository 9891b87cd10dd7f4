"""The Milvus knowledge base (milvus-lite, the embedded Milvus) on real MiniLM embeddings of real passages:
FLAT equals an exact inner-product search, each query's answer is independent of its batch and of k, HNSW
finds the true neighbours, RaLMSpec over it is token-identical to the iterative baseline, bad inputs fail
with messages naming the fix."""

from __future__ import annotations

import sys

import numpy as np
import pytest

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")

from rasd.ralmspec import IterativeRaLM, MiniLMEncoder, RaLMConfig, RaLMSpec, passages, questions
from rasd.ralmspec.milvus import MilvusRetriever

N_DUP = 20  # passages 0..19 again at ids 300..319: exact score ties, which the smaller id must win


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    """300 real Wikipedia passages plus 20 duplicates, embedded once, in FLAT and HNSW collections of one
    milvus-lite file."""
    base = passages(("wikipedia-en",), limit=300)
    ps = base + base[:N_DUP]
    enc = MiniLMEncoder()
    emb = enc.encode(base)
    emb = np.concatenate([emb, emb[:N_DUP]])  # the copies' embeddings equal to the bit (batching would not)
    uri = str(tmp_path_factory.mktemp("milvus") / "kb.db")
    flat = MilvusRetriever.build(ps, uri, "flat", embeddings=emb, encoder=enc, progress=False)
    hnsw = MilvusRetriever.build(
        ps, uri, "hnsw", embeddings=emb, encoder=enc, index="HNSW", hnsw_m=16, ef_search=32, progress=False
    )
    yield {"passages": ps, "emb": emb, "enc": enc, "uri": uri, "FLAT": flat, "HNSW": hnsw}
    # Close the clients: their gRPC threads would otherwise outlive the module, and a later fork in this
    # process (Ray starting its node processes in test_sharded) is unsafe while gRPC threads run.
    flat.close()
    hnsw.close()


def _queries(kb) -> list[str]:
    """64 queries: real questions, and the openings of passages (duplicated ones among them, so that the top
    two documents tie exactly)."""
    ps = kb["passages"]
    return questions(32) + [" ".join(ps[i].split()[:12]) for i in range(0, 320, 10)]


def _exact(kb, queries: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
    q = kb["enc"].encode_queries(queries).astype(np.float64)
    scores = (q @ kb["emb"].astype(np.float64).T).astype(np.float32)  # [Q, N]
    ids = np.stack([np.lexsort((np.arange(len(row)), -row))[:k] for row in scores])
    return ids, np.take_along_axis(scores, ids, axis=1)


@pytest.mark.real_model
def test_flat_equals_exact_inner_product_search(kb):
    r, qs = kb["FLAT"], _queries(kb)
    ids, scores = r.search(qs, 10)
    ref_ids, ref_scores = _exact(kb, qs, 10)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(scores, ref_scores, rtol=0, atol=1e-6)
    dup = [row for row in ids if row[0] < N_DUP]
    assert dup and all(row[1] == row[0] + 300 for row in dup)  # the tie: the original first, its copy next
    assert len(r) == 320 and r.passages[5] == kb["passages"][5] and r.passages[-2:] == kb["passages"][-2:]


@pytest.mark.real_model
@pytest.mark.parametrize("index", ["FLAT", "HNSW"])
def test_answer_is_independent_of_batch_and_k(kb, index):
    """RaLMSpec verifies a batch of queries with k = prefetch; each answer must be the baseline's k=1 answer
    for that query alone, to the bit."""
    r, qs = kb[index], _queries(kb)
    ids, scores = r.search(qs, 20)
    for i, q in enumerate(qs):
        one_ids, one_scores = r.search([q], 20)
        np.testing.assert_array_equal(one_ids[0], ids[i])
        np.testing.assert_array_equal(one_scores[0], scores[i])
        top_ids, top_scores = r.search([q], 1)
        assert (top_ids[0, 0], top_scores[0, 0]) == (ids[i, 0], scores[i, 0])
    np.testing.assert_array_equal(r.search(qs[::-1], 20)[0], ids[::-1])


@pytest.mark.real_model
@pytest.mark.parametrize("index", ["FLAT", "HNSW"])
def test_cache_scores_are_the_search_scores(kb, index):
    r, qs = kb[index], _queries(kb)[:8]
    ids, scores = r.search(qs, 5)
    r._emb.clear()  # the cold path: embeddings fetched from Milvus
    for q, row, sc in zip(qs, ids, scores, strict=True):
        np.testing.assert_array_equal(r.score(q, row[::-1].tolist()), sc[::-1])
        np.testing.assert_array_equal(r.score(q, row.tolist()), sc)


@pytest.mark.real_model
def test_hnsw_recall(kb):
    qs = _queries(kb)
    ids, _ = kb["HNSW"].search(qs, 10)
    ref, _ = _exact(kb, qs, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), ref.tolist(), strict=True)])
    assert recall >= 0.95, recall


@pytest.mark.real_model
def test_save_and_load(kb, tmp_path):
    kb["HNSW"].save(tmp_path / "kb")
    loaded = MilvusRetriever.load(tmp_path / "kb", encoder=kb["enc"])
    assert loaded.index == "HNSW" and loaded.ef_search == 32
    qs = questions(4)
    np.testing.assert_array_equal(loaded.search(qs, 5)[0], kb["HNSW"].search(qs, 5)[0])
    from rasd.ralmspec import load_retriever

    generic = load_retriever(tmp_path / "kb", encoder=kb["enc"])  # the one loader for every saved index
    assert isinstance(generic, MilvusRetriever) and generic.index == "HNSW"


# One RaLMSpec variant per index (test_ralmspec covers every option on faiss): no prefetching on FLAT (the
# cache holds only earlier answers: many rollbacks), prefetch + OS³ + asynchronous verification on HNSW.
VARIANTS = {
    "FLAT": {"prefetch": 1, "scheduler": 3},
    "HNSW": {"prefetch": 20, "scheduler": "os3", "async_verify": True},
}


@pytest.mark.real_model
def test_ralmspec_is_token_identical_to_the_baseline(smollm2, kb):
    model, tok = smollm2
    # A short query window moves the top passage often (speculation misses); short passages keep it fast.
    config = RaLMConfig(max_new_tokens=24, query_tokens=8, doc_tokens=64)
    counts = {}
    for index, variant in VARIANTS.items():
        base = IterativeRaLM(model, tok, kb[index], config)
        spec = RaLMSpec(model, tok, kb[index], config, **variant)
        hits = misses = 0
        for q in questions(2):
            prompt = tok(f"Question: {q}\nAnswer:").input_ids
            ref = base.generate(prompt)
            out = spec.generate(prompt)
            assert (out.tokens, out.documents) == (ref.tokens, ref.documents), (index, q)
            hits += out.stats.hits
            misses += out.stats.misses
        counts[index] = (hits, misses)
    # Speculation was right sometimes and rolled back sometimes.
    assert sum(h for h, _ in counts.values()) > 0 and sum(m for _, m in counts.values()) > 0, counts


@pytest.mark.real_model
def test_bad_inputs(kb, tmp_path, monkeypatch):
    from pymilvus import DataType, MilvusClient

    ps, emb, uri = kb["passages"], kb["emb"], kb["uri"]
    with pytest.raises(ValueError, match=r"no collection 'nope'.*MilvusRetriever.build"):
        MilvusRetriever(uri, "nope")
    with pytest.raises(ValueError, match=r"already has a collection 'flat'.*overwrite=True"):
        MilvusRetriever.build(ps, uri, "flat", embeddings=emb, progress=False)
    for bad in ("IVF_FLAT", "flat"):
        with pytest.raises(ValueError, match="index must be one of"):
            MilvusRetriever.build(ps, uri, "x", embeddings=emb, index=bad, progress=False)
        with pytest.raises(ValueError, match="index must be one of"):
            MilvusRetriever(uri, "flat", index=bad)
    with pytest.raises(ValueError, match="has a FLAT index, not HNSW"):
        MilvusRetriever(uri, "flat", index="HNSW")
    with pytest.raises(ValueError, match=r"embeddings must have shape \[320, 384\]"):
        MilvusRetriever.build(ps, uri, "x", embeddings=emb[:, :128], progress=False)
    with pytest.raises(ValueError, match="k must be >= 1"):
        kb["FLAT"].search(["a question"], 0)
    with pytest.raises(ValueError, match=r"document ids must be in \[0, 320\)"):
        kb["FLAT"].score("a question", [3, 320])
    client = MilvusClient(uri)  # a collection of 8-dim vectors, otherwise shaped like a knowledge base
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=8)
    schema.add_field("text", DataType.VARCHAR, max_length=100)
    client.create_collection("dim8", schema=schema)
    with pytest.raises(ValueError, match=r"holds 8-dim vectors.*384 dims"):
        MilvusRetriever(uri, "dim8")
    monkeypatch.setitem(sys.modules, "pymilvus", None)  # as if not installed
    with pytest.raises(ImportError, match=r"pip install 'rasd\[milvus\]'"):
        MilvusRetriever(uri, "flat")
