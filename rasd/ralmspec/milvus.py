"""A knowledge base served by Milvus: embedded (milvus-lite, ``uri="kb.db"``) for tests and single machines, a
Milvus server or cluster (``uri="http://host:19530"``) in production, with the same client code.

One collection per knowledge base: ``id`` (int64 primary key = passage index), ``embedding`` (float vector,
L2-normalised all-MiniLM-L6-v2, 384 dims, metric IP) and ``text`` (the passage). :meth:`MilvusRetriever.build`
creates and fills it; ``MilvusRetriever(uri, collection)`` opens it.

Ranking is computed here, not taken from Milvus's distances, which depend on the batch they were computed in:
milvus-lite's FLAT search is one numpy matrix product over the whole batch (a lone query goes through another
BLAS kernel; the last float bit differs), and faiss's brute force, which Milvus servers build on, switches to
BLAS from 20 queries on. RaLMSpec verifies a batch of queries and must get, for each, the document the
baseline gets asking alone, so a near-tie must not flip with the batch. :meth:`MilvusRetriever.search`
therefore asks Milvus for ``k + margin`` candidate ids per query, re-scores them row by row with their stored
embeddings (:func:`_inner_products`: each score depends on its own row and query only; the embeddings are
remembered here, unseen ones fetched in one call) and sorts by (score, smaller id). The scores are then
bit-for-bit those of :meth:`MilvusRetriever.score`, what the local cache ranks by.

The candidate set itself is per query in both index types (FLAT is exhaustive; faiss's HNSW walks the graph
for each query alone with ``ef = max(ef_search, k + margin)``, so for ``k + margin <= ef_search`` it does not
depend on ``k`` either: top-1 of a ``k=1`` call is top-1 of a ``k=20`` prefetch).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, overload

import numpy as np

from rasd.ralmspec.retrievers import FORMAT_VERSION, MiniLMEncoder

INDEXES = ("FLAT", "HNSW")
_REMOTE = ("http://", "https://", "tcp://", "grpc://", "unix:")
_TEXT_BYTES = 65535  # Milvus's VARCHAR limit
_EMB_CACHE = 16384  # embeddings remembered for score(): 24 MB at 384 dims
_TEXT_CACHE = 65536  # passage texts remembered


def _pymilvus(uri: str):
    try:
        import pymilvus
    except ImportError as exc:
        raise ImportError("the Milvus knowledge base needs pymilvus: pip install 'rasd[milvus]'") from exc
    if not uri.startswith(_REMOTE):
        try:
            import milvus_lite  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                f"{uri!r} is a local Milvus file, served by milvus-lite: pip install 'rasd[milvus]' "
                "(or pass a server uri such as http://host:19530)"
            ) from exc
    return pymilvus


def _check_index(index: str) -> None:
    if index not in INDEXES:
        raise ValueError(f"index must be one of {INDEXES}, got {index!r}")


def _inner_products(emb: np.ndarray, q: np.ndarray) -> np.ndarray:
    """float32 [n] = emb [n, d] . q [d], each row summed on its own (a multiply then a per-row reduction, no
    BLAS call), so a document's score does not depend on which other documents are scored with it."""
    return (emb.astype(np.float64) * q.astype(np.float64)).sum(axis=1).astype(np.float32)


class MilvusRetriever:
    """Dense retrieval from a Milvus collection (see module docstring), the :class:`Retriever` protocol.

    uri: a ``.db`` file (milvus-lite) or a server address. index: the index type the collection must have
    ("FLAT" or "HNSW"); None accepts either. ef_search: HNSW's search breadth. margin: extra candidates asked
    per query and re-ranked here (keep ``k + margin <= ef_search`` for HNSW). token: server credentials (not
    written by :meth:`save`).
    """

    def __init__(
        self,
        uri: str,
        collection: str,
        *,
        index: str | None = None,
        encoder: MiniLMEncoder | None = None,
        ef_search: int = 64,
        margin: int = 8,
        token: str = "",
    ) -> None:
        pymilvus = _pymilvus(uri)
        if index is not None:
            _check_index(index)
        if ef_search < 1 or margin < 0:
            raise ValueError(f"need ef_search >= 1 and margin >= 0, got {ef_search} and {margin}")
        self.uri, self.collection = uri, collection
        self.client = pymilvus.MilvusClient(uri=uri, token=token)
        if not self.client.has_collection(collection):
            raise ValueError(
                f"Milvus at {uri!r} has no collection {collection!r}: create it with "
                f"MilvusRetriever.build(passages, {uri!r}, {collection!r})"
            )
        fields = {f["name"]: f for f in self.client.describe_collection(collection)["fields"]}
        if not {"id", "embedding", "text"} <= fields.keys():
            raise ValueError(
                f"collection {collection!r} lacks the id / embedding / text fields of a rasd knowledge base: "
                "create it with MilvusRetriever.build"
            )
        dim = int(fields["embedding"]["params"]["dim"])
        if dim != MiniLMEncoder.dim:
            raise ValueError(
                f"collection {collection!r} holds {dim}-dim vectors but queries are embedded with "
                f"all-MiniLM-L6-v2 ({MiniLMEncoder.dim} dims): rebuild it with MilvusRetriever.build"
            )
        info = self.client.describe_index(collection, "embedding") or {}  # None: not indexed
        self.index = info.get("index_type")
        if info.get("metric_type") != "IP" or self.index not in INDEXES:
            raise ValueError(
                f"collection {collection!r} has a {self.index} index with metric {info.get('metric_type')}, "
                f"expected {INDEXES} with IP: rebuild it with MilvusRetriever.build"
            )
        if index is not None and index != self.index:
            raise ValueError(f"collection {collection!r} has a {self.index} index, not {index}")
        self.client.load_collection(collection)  # a new client finds it released
        self._n = int(self.client.get_collection_stats(collection)["row_count"])
        self.encoder = encoder
        self.ef_search, self.margin = ef_search, margin
        self._search_params: dict[str, Any] = {"metric_type": "IP", "params": {}}
        if self.index == "HNSW":
            self._search_params["params"]["ef"] = ef_search
        self._emb: OrderedDict[int, np.ndarray] = OrderedDict()
        self._emb_lock = threading.Lock()  # RaLMSpec's async verification searches from a worker thread
        self.passages = _Passages(self)

    def __len__(self) -> int:
        return self._n

    def _encoder(self) -> MiniLMEncoder:
        if self.encoder is None:
            self.encoder = MiniLMEncoder()
        return self.encoder

    def _embeddings(self, ids: Sequence[int]) -> dict[int, np.ndarray]:
        """The stored embedding [d] of each id: remembered ones (LRU), the rest fetched in one Milvus call.
        Documents recur across a request's strides, so the search itself carries ids only."""
        with self._emb_lock:
            known = {i: self._emb[i] for i in ids if i in self._emb}
        missing = [i for i in dict.fromkeys(ids) if i not in known]
        if missing:
            rows = self.client.get(self.collection, ids=missing, output_fields=["embedding"])
            known.update((int(r["id"]), np.asarray(r["embedding"], dtype=np.float32)) for r in rows)
        with self._emb_lock:
            for i, e in known.items():
                self._emb[i] = e
                self._emb.move_to_end(i)
            while len(self._emb) > _EMB_CACHE:
                self._emb.popitem(last=False)
        return known

    def search(self, queries: Sequence[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        """ids int64 [Q, k], scores float32 [Q, k], best first, ties by smaller id; one Milvus call for all
        queries. Rows are padded with -1 / -inf where Milvus returns fewer than ``k`` hits."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = list(queries)
        k = min(k, len(self))
        q = self._encoder().encode_queries(queries)  # [Q, d]
        hits = self.client.search(
            self.collection,
            data=q,
            limit=min(k + self.margin, len(self)),
            anns_field="embedding",
            output_fields=["id"],
            search_params=self._search_params,
        )
        cands = [np.asarray(hit.ids, dtype=np.int64) for hit in hits]
        known = self._embeddings([int(i) for c in cands for i in c])
        ids = np.full((len(queries), k), -1, dtype=np.int64)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        for row, (qv, cand) in enumerate(zip(q, cands, strict=True)):
            if not len(cand):
                continue
            sc = _inner_products(np.stack([known[int(i)] for i in cand]), qv)  # [c]
            order = np.lexsort((cand, -sc))[:k]
            ids[row, : len(order)], scores[row, : len(order)] = cand[order], sc[order]
        return ids, scores

    def score(self, query: str, doc_ids: Sequence[int]) -> np.ndarray:
        """float32 [len(doc_ids)]: inner products with the stored embeddings, exactly what :meth:`search`
        ranks by (the local cache scores documents a search returned: their embeddings are remembered)."""
        doc_ids = [int(i) for i in doc_ids]
        if not doc_ids:
            return np.zeros(0, dtype=np.float32)
        if min(doc_ids) < 0 or max(doc_ids) >= len(self):
            raise ValueError(f"document ids must be in [0, {len(self)}), got {doc_ids}")
        known = self._embeddings(doc_ids)
        emb = np.stack([known[i] for i in doc_ids])  # [n, d]
        return _inner_products(emb, self._encoder().encode_queries([query])[0])

    @classmethod
    def build(
        cls,
        passages: Sequence[str],
        uri: str,
        collection: str,
        *,
        embeddings: np.ndarray | None = None,
        index: str = "FLAT",
        encoder: MiniLMEncoder | None = None,
        hnsw_m: int = 32,  # HNSW graph degree (DenseRetriever's default)
        ef_construction: int = 80,  # HNSW build breadth (DenseRetriever's default)
        ef_search: int = 64,  # HNSW search breadth
        margin: int = 8,  # candidates re-ranked beyond k (see module docstring)
        batch_size: int = 2048,  # rows per insert call (~5 MB of vectors and text)
        overwrite: bool = False,
        progress: bool = True,
        token: str = "",
    ) -> MilvusRetriever:
        """Create ``collection`` at ``uri`` from ``passages`` (embedded with ``encoder`` unless ``embeddings``
        float32 [len(passages), 384] are given), index it and open it."""
        pymilvus = _pymilvus(uri)
        _check_index(index)
        passages = list(passages)
        if not passages:
            raise ValueError("no passages to index")
        too_long = [i for i, p in enumerate(passages) if len(p.encode()) > _TEXT_BYTES]
        if too_long:
            raise ValueError(
                f"passages {too_long[:5]} exceed Milvus's {_TEXT_BYTES}-byte text field: split them "
                "(rasd.ralmspec.corpus.split_passages)"
            )
        if embeddings is None:
            encoder = encoder or MiniLMEncoder()
            embeddings = encoder.encode(passages, progress=progress)
        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.shape != (len(passages), MiniLMEncoder.dim):
            raise ValueError(
                f"embeddings must have shape [{len(passages)}, {MiniLMEncoder.dim}] (all-MiniLM-L6-v2, one "
                f"per passage), got {tuple(embeddings.shape)}"
            )
        client = pymilvus.MilvusClient(uri=uri, token=token)
        if client.has_collection(collection):
            if not overwrite:
                raise ValueError(
                    f"Milvus at {uri!r} already has a collection {collection!r}: open it with "
                    "MilvusRetriever(uri, collection), or pass overwrite=True to rebuild it"
                )
            client.drop_collection(collection)
        schema = pymilvus.MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.INT64, is_primary=True)
        schema.add_field("embedding", pymilvus.DataType.FLOAT_VECTOR, dim=MiniLMEncoder.dim)
        schema.add_field("text", pymilvus.DataType.VARCHAR, max_length=_TEXT_BYTES)
        client.create_collection(collection, schema=schema)
        starts: Iterator[int] | range = range(0, len(passages), batch_size)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="insert into Milvus", unit="batch")
        for s in starts:
            rows = range(s, min(s + batch_size, len(passages)))
            client.insert(
                collection, [{"id": i, "embedding": embeddings[i], "text": passages[i]} for i in rows]
            )
        client.flush(collection)
        params = client.prepare_index_params()
        build_params = {"M": hnsw_m, "efConstruction": ef_construction} if index == "HNSW" else {}
        params.add_index(field_name="embedding", index_type=index, metric_type="IP", params=build_params)
        client.create_index(collection, params)
        client.close()
        return cls(uri, collection, encoder=encoder, ef_search=ef_search, margin=margin, token=token)

    def save(self, path: str | Path) -> None:
        """Write ``path/meta.json`` pointing at the collection (the data stays in Milvus; a local ``.db`` uri
        is made absolute)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        uri = self.uri if self.uri.startswith(_REMOTE) else str(Path(self.uri).resolve())
        meta = {
            "format": FORMAT_VERSION,
            "type": "milvus",
            "uri": uri,
            "collection": self.collection,
            "index": self.index,
            "ef_search": self.ef_search,
            "margin": self.margin,
        }
        (path / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path, encoder: MiniLMEncoder | None = None, token: str = "") -> MilvusRetriever:
        """Open the collection a :meth:`save` directory points at."""
        meta = json.loads((Path(path) / "meta.json").read_text())
        if meta.get("type") != "milvus":
            raise ValueError(f"{path} is not a Milvus knowledge base (meta.json type {meta.get('type')!r})")
        return cls(
            meta["uri"],
            meta["collection"],
            index=meta["index"],
            encoder=encoder,
            ef_search=meta["ef_search"],
            margin=meta["margin"],
            token=token,
        )

    def close(self) -> None:
        self.client.close()


class _Passages(Sequence[str]):
    """The collection's passage texts, fetched from Milvus on first use and remembered (a generation reads a
    few of them; the whole knowledge base need not fit here)."""

    def __init__(self, owner: MilvusRetriever) -> None:
        self._owner = owner
        self._text: OrderedDict[int, str] = OrderedDict()

    def __len__(self) -> int:
        return len(self._owner)

    @overload
    def __getitem__(self, i: int) -> str: ...

    @overload
    def __getitem__(self, i: slice) -> list[str]: ...

    def __getitem__(self, i: int | slice) -> str | list[str]:
        n = len(self)
        wanted = list(range(n)[i]) if isinstance(i, slice) else [i + n if i < 0 else i]
        if any(not 0 <= j < n for j in wanted):
            raise IndexError(f"passage index {i} out of range for {n} passages")
        missing = [j for j in dict.fromkeys(wanted) if j not in self._text]
        if missing:
            owner = self._owner
            for r in owner.client.get(owner.collection, ids=missing, output_fields=["text"]):
                self._text[int(r["id"])] = r["text"]
        for j in wanted:
            self._text.move_to_end(j)
        out = [self._text[j] for j in wanted]
        while len(self._text) > _TEXT_CACHE:
            self._text.popitem(last=False)
        return out if isinstance(i, slice) else out[0]
