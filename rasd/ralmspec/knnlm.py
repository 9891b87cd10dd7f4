"""KNN-LM (Khandelwal et al., 2020) and its speculative-retrieval twin (RaLMSpec, Zhang et al., 2024).

Datastore (:class:`KNNDatastore`): the LM itself is run over a real corpus; every position contributes one
entry ``key = final hidden state`` (the input of ``lm_head``, after the final norm) ``-> value = the next
token``. Entries keep corpus order, so entry ``i + 1`` is what followed entry ``i`` in the text. Search is a
faiss L2 index over the keys: exact (``IndexFlatL2``) or HNSW.

Decoding (:class:`KNNLM`, the baseline): at every step the hidden state of the last position queries the
datastore for its ``k`` nearest entries, ``p_kNN(w) ∝ Σ_{neighbours with value w} exp(-d / T)`` (d = squared
L2 distance, recomputed in float64 from the stored keys so that the result depends only on *which* entries
were returned), ``p = λ·p_kNN + (1 - λ)·p_LM``, and the token is ``argmax p`` (greedy).

Speculative (:class:`SpeculativeKNNLM`): a per-request local cache of datastore entries. After every
knowledge-base answer, each returned neighbour ``i`` and the ``n`` entries after it (``i + 1 .. i + n``: the
continuation of the text it came from, which the next steps are likely to retrieve) enter the cache. For s
steps the neighbours are searched in the cache instead (exact, numpy) and the token is decoded from them;
then the s hidden states are searched in the datastore in one batched call. A step is accepted when the
token decoded from the true neighbours equals the speculated one; at the first mismatch the true token
replaces it (its hidden state came from an accepted prefix, so it is exactly the baseline's token) and the
later steps are rolled back (the KV cache is cropped). Output is token-identical to :class:`KNNLM`.
The stride s comes from the OS³ scheduler or is fixed. With ``async_verify`` the batched query runs in a
worker thread while one more step is speculated (faiss releases the GIL, so the two overlap).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rasd.ralmspec.ralm import RaLMOutput, RaLMStats, _done, eos_ids
from rasd.ralmspec.retrievers import _faiss
from rasd.ralmspec.speculation import speculate, stride_policy
from rasd.verify import with_cache

FORMAT_VERSION = 1
# faiss switches from its per-query distance loop to a BLAS formulation at 20 queries per call; below that
# a query's neighbours do not depend on the other queries of the batch. Verification batches stay below.
_MAX_STRIDE = 16


def _model_tag(model: torch.nn.Module) -> dict[str, Any]:
    cfg = model.config
    return {
        "model_type": getattr(cfg, "model_type", "?"),
        "hidden_size": int(cfg.hidden_size),
        "vocab_size": int(model.get_output_embeddings().weight.shape[0]),
        "num_hidden_layers": int(getattr(cfg, "num_hidden_layers", 0)),
        "name_or_path": str(getattr(cfg, "_name_or_path", "")),
    }


class KNNDatastore:
    """(hidden state -> next token) entries with a faiss L2 index over the keys.

    keys: [N, d] float32, values: [N] int64 token ids, index_kind: "flat" (exact) or "hnsw".
    ``model_tag`` records the model the keys came from; :meth:`check_model` refuses another one.
    """

    def __init__(
        self,
        keys: np.ndarray,
        values: np.ndarray,
        *,
        index_kind: str = "flat",
        hnsw_m: int = 32,
        ef_search: int = 128,
        model_tag: dict[str, Any] | None = None,
    ) -> None:
        if index_kind not in ("flat", "hnsw"):
            raise ValueError(f"index_kind must be 'flat' or 'hnsw', got {index_kind!r}")
        keys = np.ascontiguousarray(keys, dtype=np.float32)
        values = np.asarray(values, dtype=np.int64)
        if keys.ndim != 2 or values.shape != (keys.shape[0],):
            raise ValueError(f"keys must be [N, d] and values [N], got {keys.shape} and {values.shape}")
        if len(keys) == 0:
            raise ValueError("the datastore is empty: build it from a non-empty corpus")
        self.keys, self.values = keys, values
        self.index_kind, self.hnsw_m, self.ef_search = index_kind, hnsw_m, ef_search
        self.model_tag = model_tag or {}
        faiss = _faiss()
        dim = keys.shape[1]
        if index_kind == "flat":
            self.index = faiss.IndexFlatL2(dim)
        else:
            self.index = faiss.IndexHNSWFlat(dim, hnsw_m)
            self.index.hnsw.efSearch = ef_search
        self.index.add(keys)

    def __len__(self) -> int:
        return len(self.values)

    @property
    def dim(self) -> int:
        return self.keys.shape[1]

    def search(self, queries: np.ndarray, k: int) -> np.ndarray:
        """Ids [q, k] of the k nearest entries of each query [q, d] (nearest first; -1 pads)."""
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [q, {self.dim}], got {queries.shape}")
        _, ids = self.index.search(queries, k)
        return ids

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise when ``model`` is not the model whose hidden states the keys are."""
        tag = _model_tag(model)
        for field in ("hidden_size", "vocab_size", "model_type", "num_hidden_layers"):
            if field in self.model_tag and self.model_tag[field] != tag[field]:
                raise ValueError(
                    "this KNN-LM datastore was built with "
                    f"{self.model_tag.get('name_or_path') or 'another model'} ({field}="
                    f"{self.model_tag[field]}), not with this model ({field}={tag[field]}): build a "
                    "datastore with the model you decode with (KNNDatastore.build or `rasd ralm index build "
                    "--kind knnlm`)"
                )

    @classmethod
    @torch.inference_mode()
    def build(
        cls,
        model: torch.nn.Module,
        tokenizer: Any,
        texts: Sequence[str],
        *,
        max_entries: int | None = None,
        chunk_tokens: int = 512,
        progress: bool = False,
        **index_kw: Any,
    ) -> KNNDatastore:
        """Run ``model`` over ``texts`` (each cut into ``chunk_tokens`` windows) and store one entry per
        position that has a next token; ``max_entries`` caps the size (a corpus-size knob)."""
        device = next(model.parameters()).device
        decoder = model.get_decoder()  # the final hidden state (after the last norm) without the lm_head
        keys: list[np.ndarray] = []
        values: list[np.ndarray] = []
        total = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=max_entries or None, desc="KNN-LM datastore", unit="entries")
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False).input_ids
            for start in range(0, max(len(ids) - 1, 0), chunk_tokens):
                window = ids[start : start + chunk_tokens + 1]
                if len(window) < 2:
                    continue
                out = decoder(input_ids=torch.tensor([window[:-1]], device=device))
                hidden = out.last_hidden_state[0].float().cpu().numpy()
                take = len(window) - 1
                if max_entries is not None:
                    take = min(take, max_entries - total)
                keys.append(hidden[:take])
                values.append(np.asarray(window[1 : take + 1], dtype=np.int64))
                total += take
                if bar is not None:
                    bar.update(take)
                if max_entries is not None and total >= max_entries:
                    break
            if max_entries is not None and total >= max_entries:
                break
        if bar is not None:
            bar.close()
        if not keys:
            raise ValueError("no entries: the texts are empty after tokenization")
        return cls(np.concatenate(keys), np.concatenate(values), model_tag=_model_tag(model), **index_kw)

    def save(self, path: str | Path) -> None:
        """A directory with meta.json, keys.npy and values.npy (the index is rebuilt on load)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "keys.npy", self.keys)
        np.save(path / "values.npy", self.values)
        meta = {
            "format": FORMAT_VERSION,
            "type": "knnlm",
            "index_kind": self.index_kind,
            "hnsw_m": self.hnsw_m,
            "ef_search": self.ef_search,
            "entries": len(self),
            "model": self.model_tag,
        }
        (path / "meta.json").write_text(json.dumps(meta))

    @classmethod
    def load(cls, path: str | Path) -> KNNDatastore:
        path = Path(path)
        try:
            meta = json.loads((path / "meta.json").read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{path} is not a rasd KNN-LM datastore (meta.json missing or corrupt): {exc}"
            ) from exc
        if meta.get("type") != "knnlm" or meta.get("format") != FORMAT_VERSION:
            raise ValueError(
                f"{path} is not a rasd KNN-LM datastore of format {FORMAT_VERSION} "
                f"(type {meta.get('type')!r}, format {meta.get('format')!r}): rebuild it"
            )
        try:
            keys = np.load(path / "keys.npy", mmap_mode="r")
            values = np.load(path / "values.npy")
        except (OSError, ValueError) as exc:
            raise ValueError(
                f"{path}: keys.npy / values.npy unreadable or truncated ({exc}): rebuild it"
            ) from exc
        if len(keys) != meta["entries"] or len(values) != meta["entries"]:
            raise ValueError(
                f"{path}: meta.json says {meta['entries']} entries, found {len(keys)} keys and {len(values)} "
                "values (truncated copy?): rebuild it"
            )
        return cls(
            keys,
            values,
            index_kind=meta["index_kind"],
            hnsw_m=meta["hnsw_m"],
            ef_search=meta["ef_search"],
            model_tag=meta["model"],
        )


@dataclass
class KNNConfig:
    """k: neighbours per query. lam: weight λ of p_kNN. temperature: T of exp(-d / T) (squared L2).
    max_new_tokens: generation cap."""

    k: int = 16
    lam: float = 0.25
    temperature: float = 10.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"lam must be in [0, 1], got {self.lam}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


def knn_probs(
    hidden: np.ndarray, logits: torch.Tensor, ids: np.ndarray, store: KNNDatastore, config: KNNConfig
) -> torch.Tensor:
    """p = λ·p_kNN + (1 - λ)·p_LM [V] (float64) for one position.

    hidden: [d] the query, logits: [V] the LM's next-token logits, ids: [k] datastore entries (-1 ignored).
    """
    p = torch.softmax(logits.double(), dim=-1) * (1.0 - config.lam)
    ids = ids[ids >= 0]
    if len(ids):
        diff = store.keys[ids].astype(np.float64) - hidden.astype(np.float64)[None, :]
        d = np.einsum("ij,ij->i", diff, diff)
        w = np.exp(-(d - d.min()) / config.temperature)
        w /= w.sum()
        vals = torch.from_numpy(store.values[ids])
        p.index_add_(0, vals.to(p.device), torch.from_numpy(w * config.lam).to(p.device))
    return p


def knn_token(
    hidden: np.ndarray, logits: torch.Tensor, ids: np.ndarray, store: KNNDatastore, config: KNNConfig
) -> int:
    """The greedy KNN-LM token: argmax of :func:`knn_probs`."""
    return int(knn_probs(hidden, logits, ids, store, config).argmax())


class _Decoder:
    """One-token-at-a-time greedy decoding that exposes the last hidden state and logits."""

    def __init__(self, model: torch.nn.Module, store: KNNDatastore, config: KNNConfig) -> None:
        store.check_model(model)
        self.vocab = vocab = model.get_output_embeddings().weight.shape[0]
        if len(store.values) and (store.values.min() < 0 or store.values.max() >= vocab):
            raise ValueError(
                f"datastore token ids are outside this model's vocabulary [0, {vocab}): rebuild it"
            )
        self.model, self.store, self.config = model, store, config
        self.device = next(model.parameters()).device
        self.eos = eos_ids(model)

    @torch.inference_mode()
    def feed(self, tokens: list[int], cache: Any) -> tuple[np.ndarray, torch.Tensor]:
        """Feed ``tokens`` after ``cache``; the hidden state [d] and logits [V] of the last position."""
        out = self.model(
            input_ids=torch.tensor([tokens], device=self.device),
            use_cache=True,
            **with_cache(self.model, cache),
            output_hidden_states=True,
        )
        return out.hidden_states[-1][0, -1].float().cpu().numpy(), out.logits[0, -1].float()

    def start(self, prompt: list[int]) -> tuple[Any, np.ndarray, torch.Tensor]:
        from transformers import DynamicCache

        if not prompt:
            raise ValueError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab:
            raise ValueError(f"prompt token ids must be in [0, {self.vocab})")
        cache = DynamicCache()
        hidden, logits = self.feed(prompt, cache)
        return cache, hidden, logits

    def done(self, generated: list[int]) -> bool:
        return _done(generated, self, self.config.max_new_tokens)


class KNNLM:
    """The KNN-LM baseline: one datastore query per generated token."""

    def __init__(self, model: torch.nn.Module, store: KNNDatastore, config: KNNConfig | None = None) -> None:
        self.config = config or KNNConfig()
        self.store = store
        self.dec = _Decoder(model, store, self.config)

    def generate(self, prompt: list[int]) -> RaLMOutput:
        dec, cfg, stats = self.dec, self.config, RaLMStats()
        start = time.perf_counter()
        cache, hidden, logits = dec.start(prompt)
        stats.time_generation += time.perf_counter() - start
        generated: list[int] = []
        while not dec.done(generated):
            t0 = time.perf_counter()
            ids = self.store.search(hidden[None], cfg.k)[0]
            t1 = time.perf_counter()
            token = knn_token(hidden, logits, ids, self.store, cfg)
            generated.append(token)
            if not dec.done(generated):
                hidden, logits = dec.feed([token], cache)
            stats.time_retrieval += t1 - t0
            stats.time_generation += time.perf_counter() - t1
            stats.kb_calls += 1
            stats.kb_queries += 1
            stats.strides += 1
        stats.time_total = time.perf_counter() - start
        return RaLMOutput(generated, [], stats)


class _EntryCache:
    """Datastore entries seen by this request (neighbours and the ``lookahead`` entries after each); exact
    k-nearest search among them."""

    def __init__(self, store: KNNDatastore, lookahead: int) -> None:
        self.store, self.lookahead = store, lookahead
        self._ids = np.zeros(0, dtype=np.int64)
        self._keys = np.zeros((0, store.dim), dtype=np.float32)

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids).reshape(-1)
        ids = ids[ids >= 0]
        if not len(ids):
            return
        span = (ids[:, None] + np.arange(self.lookahead + 1)[None, :]).reshape(-1)
        span = np.unique(span[span < len(self.store)])
        new = np.setdiff1d(span, self._ids, assume_unique=True)
        if len(new):
            self._ids = np.concatenate([self._ids, new])
            self._keys = np.concatenate([self._keys, self.store.keys[new]])

    def search(self, hidden: np.ndarray, k: int) -> np.ndarray:
        if not len(self._ids):
            return np.zeros(0, dtype=np.int64)
        d = ((self._keys - hidden[None, :]) ** 2).sum(1)
        k = min(k, len(d))
        top = np.argpartition(d, k - 1)[:k]
        return self._ids[top[np.argsort(d[top])]]


class SpeculativeKNNLM:
    """KNN-LM with speculative retrieval from a local entry cache; token-identical to :class:`KNNLM`.

    lookahead: entries after each returned neighbour that enter the cache (n). scheduler: "os3" or a fixed
    number of speculated steps per batched verification (at most 16). async_verify: the batched datastore
    query runs in a worker thread while the main thread speculates one more step from the cache (kept if
    every verified step was right, rolled back otherwise).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        store: KNNDatastore,
        config: KNNConfig | None = None,
        *,
        lookahead: int = 8,
        scheduler: str | int = "os3",
        async_verify: bool = False,
    ) -> None:
        if lookahead < 0:
            raise ValueError(f"lookahead must be >= 0, got {lookahead}")
        stride_policy(scheduler, max_stride=_MAX_STRIDE)  # validates the option
        self.config = config or KNNConfig()
        self.store = store
        self.lookahead = lookahead
        self.scheduler = scheduler
        self.async_verify = async_verify
        self.dec = _Decoder(model, store, self.config)
        self._pool = ThreadPoolExecutor(max_workers=1) if async_verify else None

    def generate(self, prompt: list[int]) -> RaLMOutput:
        stats = RaLMStats()
        start = time.perf_counter()
        task = _KNNTask(self, prompt)
        stats.time_generation += time.perf_counter() - start
        policy = stride_policy(self.scheduler, async_verify=self.async_verify, max_stride=_MAX_STRIDE)
        speculate(task, policy, stats, self._pool)
        stats.time_total = time.perf_counter() - start
        return RaLMOutput(task.generated, [], stats)


@dataclass(frozen=True)
class _Position:
    """A decoding position: the LM's last hidden state [d] (the datastore query) and logits [V]."""

    hidden: np.ndarray
    logits: torch.Tensor


class _KNNTask:
    """One speculative KNN-LM request as a :class:`~rasd.ralmspec.speculation.Speculation`: a step is one
    token; the context is the position's hidden state and logits; the cache is :class:`_EntryCache`."""

    def __init__(self, spec: SpeculativeKNNLM, prompt: list[int]) -> None:
        self.spec, self.dec, self.store, self.config = spec, spec.dec, spec.store, spec.config
        self.cache, hidden, logits = self.dec.start(prompt)
        self.position = _Position(hidden, logits)
        self.entries = _EntryCache(spec.store, spec.lookahead)
        self.generated: list[int] = []

    def done(self) -> bool:
        return self.dec.done(self.generated)

    def context(self) -> _Position:
        return self.position

    def query(self, context: _Position) -> np.ndarray:
        return context.hidden

    def guess(self, context: _Position) -> int:
        near = self.entries.search(context.hidden, self.config.k)
        return self.answer(context, near)

    def answer(self, context: _Position, result: np.ndarray) -> int:
        return knn_token(context.hidden, context.logits, result, self.store, self.config)

    def commit(self, token: int) -> tuple[int, int]:
        """Append ``token`` and feed it (the KV cache grows by one); the mark is (position, KV length)."""
        mark = (len(self.generated), self.cache.get_seq_length())
        self.generated.append(token)
        if not self.dec.done(self.generated):
            self.position = _Position(*self.dec.feed([token], self.cache))
        return mark

    def rollback(self, mark: tuple[int, int]) -> int:
        pos, cache_len = mark
        discarded = len(self.generated) - pos
        del self.generated[pos:]
        extra = self.cache.get_seq_length() - cache_len
        if extra:
            self.cache.crop(-extra)
        return discarded

    def search(self, queries: list[np.ndarray]) -> np.ndarray:
        return self.store.search(np.stack(queries), self.config.k)

    def prepare(self, queries: list[np.ndarray]) -> None:
        pass

    def learn(self, result: np.ndarray) -> None:
        self.entries.add(result)
