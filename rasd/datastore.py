"""The suffix-automaton datastore: retrieval trees of likely continuations, from a corpus or a prompt.

>>> store = Datastore()                      # mutable, in memory
>>> store.add(tokenizer(text).input_ids)     # one document; matches never cross documents
>>> tree = store.retrieve(context_ids, max_nodes=32, max_depth=8)   # rasd.TokenTree
>>> store.save("corpus.rasd", tokenizer=tokenizer)
>>> static = Datastore.load("corpus.rasd", tokenizer=tokenizer)     # mmap'd, read-only, opens in ms

The same class serves both roles rasd needs:

- **static corpus store** (REST-style): built once (``rasd datastore build``), saved, memory-mapped by any
  number of processes; query it through a :class:`Matcher` fed incrementally during decoding.
- **dynamic store** (PLD-style): grown with :meth:`Datastore.extend` from the prompt and every accepted
  token; :meth:`Datastore.retrieve_tail` continues the longest suffix of the text that occurred earlier.

Retrieval trees hold, for the longest matched suffix s of the context, the continuations that followed the
occurrences of s, merged into a trie, best-first by occurrence count: ``scores`` are smoothed conditional
frequencies count(s·path·a) / (1 + sum over siblings), i.e. with one pseudo-occurrence of an unseen
continuation, so a continuation seen once scores 0.5 rather than certainty (raw counts with
``score="count"``). With
``backoff_min_count=k`` a match whose continuations were seen fewer than k times backs off to shorter
suffixes (more occurrences, weaker context) until one has at least k.

Thread safety: queries may run from many threads at once (the native calls release the GIL); a mutable
store being extended is protected by a reader/writer lock, and matchers stay valid across extensions.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rasd import _core
from rasd.tree import Source, TokenTree

# Checksum every section on load below this size unless told otherwise. CRC-32 runs at ~1.8 GB/s on a 2-core
# EPYC (slicing-by-8): 0.57 s for the 886 MB stdlib+docs+ShareGPT store. Above 1 GiB the check is left to
# `rasd datastore verify` / Datastore.check_integrity(): an undetected flipped bit can only mis-rank
# retrieval (a wrong candidate is verified away: speed, never output), while crashes and hangs are ruled out
# with or without checksums (counts bounded by the file, every index and suffix-link step checked on use).
_VERIFY_LIMIT_BYTES = 1 << 30
_NAME_BYTES = 127  # the file's tokenizer-name field


@dataclass(frozen=True)
class TokenizerIdentity:
    """Who tokenized a datastore: a name, the sha256 of its vocabulary (token -> id), its size, and the sha256
    of the whole tokenizer (normalizer, pre-tokenizer, model with its merges, added tokens; "" where the
    tokenizer has no serialisable backend)."""

    name: str
    vocab_hash: str
    vocab_size: int
    full_hash: str = ""


def _truncate_utf8(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` bytes of UTF-8, never inside a character."""
    return text.encode()[:limit].decode("utf-8", errors="ignore")


_fingerprints: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tokenizer_fingerprint(tokenizer: Any) -> TokenizerIdentity:
    """Identity of a Hugging Face tokenizer. Two tokenizers with the same vocabulary and merges (e.g. the
    Qwen2.5-Coder 0.5B and 1.5B ones) share the hashes and may share datastores. Computed once per
    tokenizer object (about a second for Qwen's 151k-token tokenizer) and cached."""
    try:
        return _fingerprints[tokenizer]
    except (KeyError, TypeError):
        pass
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256(
        json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    )
    full = ""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        # What maps text to ids; truncation/padding settings and decoders do not change the tokens.
        kept = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model", "added_tokens")}
        model = kept.get("model") or {}
        if isinstance(model.get("merges"), list):
            # tokenizers >= 0.20 writes merges as pairs, older releases as "a b" strings: one form.
            model["merges"] = [" ".join(m) if isinstance(m, list) else m for m in model["merges"]]
        full = hashlib.sha256(json.dumps(kept, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
    name = Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name
    size = max(len(tokenizer), max(vocab.values()) + 1)
    identity = TokenizerIdentity(_truncate_utf8(name, _NAME_BYTES), digest.hexdigest(), size, full)
    with contextlib.suppress(TypeError):  # objects that cannot be weakly referenced are not cached
        _fingerprints[tokenizer] = identity
    return identity


def _as_tokens(tokens: Any, vocab_size: int | None, what: str = "tokens") -> np.ndarray:
    arr = np.asarray(tokens)
    if arr.ndim == 2 and arr.shape[0] == 1:  # a [1, L] batch of one, as tokenizers return
        arr = arr[0]
    if arr.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what} must be integer token ids, got {arr.dtype}")
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0:
            raise ValueError(f"{what} contain a negative id ({lo})")
        if vocab_size is not None and hi >= vocab_size:
            raise ValueError(
                f"{what} contain id {hi}, outside this datastore's vocabulary of {vocab_size}: "
                "wrong tokenizer for this datastore?"
            )
        if hi > np.iinfo(np.int32).max:
            raise ValueError(f"{what} contain id {hi}, larger than int32")
    return np.ascontiguousarray(arr, dtype=np.int32)


class Datastore:
    """A suffix-automaton datastore (mutable in memory, or a read-only mapped file; see module docs).

    vocab_size: when given, token ids are checked against it (loaded stores take it from the file).
    """

    def __init__(self, *, vocab_size: int | None = None) -> None:
        if vocab_size is not None and vocab_size <= 0:
            raise ValueError(f"vocab_size must be positive, got {vocab_size}")
        self._native: Any = _core.SuffixAutomaton()
        self._vocab_size = vocab_size
        self._path: Path | None = None
        self._identity: TokenizerIdentity | None = None

    # -- building ---------------------------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return isinstance(self._native, _core.MappedDatastore)

    def _mutable(self) -> Any:
        if self.read_only:
            raise ValueError(
                f"{self._path} is a read-only mapped datastore; build a new Datastore to add text"
            )
        return self._native

    def add(self, tokens: Any) -> int:
        """Add a document; returns its id."""
        return int(self._mutable().add_document(_as_tokens(tokens, self._vocab_size)))

    def extend(self, tokens: Any) -> None:
        """Append tokens to the current document (starting document 0 if there is none)."""
        self._mutable().extend(_as_tokens(tokens, self._vocab_size))

    # -- queries ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self._native.num_tokens)

    @property
    def num_documents(self) -> int:
        return int(self._native.num_documents)

    @property
    def vocab_size(self) -> int | None:
        return self._vocab_size

    def matcher(self) -> Matcher:
        """An incremental matcher: feed context tokens as they come, retrieve at any point."""
        return Matcher(self)

    def match(self, context: Any) -> int:
        """Length of the longest suffix of ``context`` that occurs in the store."""
        return self.matcher().feed(context)

    def retrieve(
        self,
        context: Any,
        max_nodes: int = 64,
        max_depth: int = 16,
        *,
        min_match: int = 1,
        min_count: int = 1,
        backoff_min_count: int = 0,
        score: str = "ratio",
        source: Source = Source.CORPUS,
    ) -> TokenTree:
        """The retrieval tree continuing the longest matched suffix of ``context`` (empty if none)."""
        m = self.matcher()
        m.feed(context)
        return m.retrieve(
            max_nodes,
            max_depth,
            min_match=min_match,
            min_count=min_count,
            backoff_min_count=backoff_min_count,
            score=score,
            source=source,
        )

    def tail_match(self) -> int:
        """Length of the longest suffix of the current document that also occurs earlier (prompt lookup)."""
        return int(self._mutable().tail_match()[1])

    def retrieve_tail(
        self, max_nodes: int = 64, max_depth: int = 16, *, source: Source = Source.PROMPT, **kwargs: Any
    ) -> TokenTree:
        """Continuations of the current document's tail (see :meth:`tail_match`), for prompt lookup."""
        state, length = self._mutable().tail_match()
        return self._tree(state, length, max_nodes, max_depth, source=source, **kwargs)

    def _tree(
        self,
        state: int,
        length: int,
        max_nodes: int,
        max_depth: int,
        *,
        min_match: int = 1,
        min_count: int = 1,
        backoff_min_count: int = 0,
        score: str = "ratio",
        source: Source = Source.CORPUS,
    ) -> TokenTree:
        if score not in ("ratio", "count"):
            raise ValueError(f"score must be 'ratio' or 'count', got {score!r}")
        if max_nodes < 0 or max_depth < 0 or min_match < 1:
            raise ValueError("max_nodes and max_depth must be >= 0 and min_match >= 1")
        tokens, parents, scores, _counts, matched = self._native.retrieve(
            state,
            length,
            max_nodes=max_nodes,
            max_depth=max_depth,
            min_match=min_match,
            min_count=min_count,
            backoff_min_count=backoff_min_count,
            raw_counts=score == "count",
        )
        if self._vocab_size is not None and len(tokens) and int(tokens.max()) >= self._vocab_size:
            raise ValueError(
                f"corrupt datastore {self._path}: token id {int(tokens.max())} outside its vocabulary"
            )
        n = len(tokens)
        return TokenTree(
            tokens,
            parents,
            scores=scores,
            sources=np.full(n, int(source), np.uint8),
            match_lengths=np.full(n, matched, np.int32),
        )

    # -- persistence ------------------------------------------------------------------------------
    def save(
        self, path: str | os.PathLike, *, tokenizer: Any = None, identity: TokenizerIdentity | None = None
    ) -> None:
        """Write a versioned, checksummed file (atomically: a temporary file renamed into place).

        Pass the ``tokenizer`` that produced the tokens (or its ``identity``) so that loading with another
        tokenizer is refused.
        """
        if tokenizer is not None:
            identity = tokenizer_fingerprint(tokenizer)
        identity = identity or self._identity
        native = self._mutable()
        if identity is None:
            # No tokenizer: the vocabulary is recorded as unknown (0), not guessed from the largest id seen
            # (a guess that would refuse the tokenizer's other ids later, part-way through generation).
            identity = TokenizerIdentity("unknown", "", self._vocab_size or 0)
        if self._vocab_size is not None and identity.vocab_size and identity.vocab_size < self._vocab_size:
            raise ValueError("the tokenizer's vocabulary is smaller than the datastore's")
        if identity.vocab_size and int(native.max_token) >= identity.vocab_size:
            raise ValueError(
                f"the datastore holds token id {native.max_token}, outside tokenizer {identity.name!r}'s "
                f"vocabulary of {identity.vocab_size}: it was built with another tokenizer"
            )
        if "\0" in str(path):
            raise ValueError("the datastore path contains a NUL byte")
        native.save(
            str(path),
            _truncate_utf8(identity.name, _NAME_BYTES),
            identity.vocab_hash,
            identity.vocab_size,
            identity.full_hash,
        )

    @classmethod
    def load(cls, path: str | os.PathLike, *, tokenizer: Any = None, verify: bool | None = None) -> Datastore:
        """Map a saved datastore read-only.

        tokenizer: if given, must have the vocabulary the file was built with (ValueError otherwise).
        verify: check every section's CRC32 (reads the whole file); default: only for files under 1 GiB.
        The header and section bounds are always checked, and every index read from the file is
        bounds-checked on use, so corrupt or truncated files raise ValueError instead of crashing.
        """
        if "\0" in str(path):
            raise ValueError(f"the datastore path {str(path)!r} contains a NUL byte")
        path = Path(path)
        if verify is None:
            verify = path.is_file() and path.stat().st_size < _VERIFY_LIMIT_BYTES
        native = _core.MappedDatastore(str(path), bool(verify))
        store = cls.__new__(cls)
        store._native = native
        store._vocab_size = int(native.vocab_size) or None
        store._path = path
        store._identity = TokenizerIdentity(
            native.tokenizer_name, native.tokenizer_hash, int(native.vocab_size), native.tokenizer_full_hash
        )
        if tokenizer is not None:
            store.check_tokenizer(tokenizer)
        return store

    def check_tokenizer(self, tokenizer: Any) -> None:
        """ValueError unless ``tokenizer`` is the one this datastore was built with (same vocabulary and,
        where both record it, the same merges and normalisation). A store saved without a tokenizer
        accepts any tokenizer whose ids fit."""
        given = tokenizer_fingerprint(tokenizer)
        mine = self._identity
        where = f"datastore {self._path}" if self._path else "this datastore"
        fix = (
            f"rebuild it with `rasd datastore build --tokenizer {given.name} ...` or pass the matching "
            "tokenizer"
        )
        if mine is None or not mine.vocab_hash:
            if self._vocab_size is not None and given.vocab_size < self._vocab_size:
                raise ValueError(
                    f"{where} holds ids up to {self._vocab_size - 1}: tokenizer {given.name!r} is too small"
                )
            return
        if mine.vocab_hash != given.vocab_hash:
            raise ValueError(
                f"{where} was built with tokenizer {mine.name!r} (vocabulary {mine.vocab_size}, hash "
                f"{mine.vocab_hash[:12]}), but tokenizer {given.name!r} (vocabulary {given.vocab_size}, hash "
                f"{given.vocab_hash[:12]}) was given; {fix}"
            )
        if mine.full_hash and given.full_hash and mine.full_hash != given.full_hash:
            raise ValueError(
                f"{where} was built with tokenizer {mine.name!r}; {given.name!r} has the same vocabulary but "
                f"different merges or normalisation (tokenizer hash {mine.full_hash[:12]} vs "
                f"{given.full_hash[:12]}), so the same text gives other ids; {fix}"
            )

    def check_integrity(self, *, progress: bool = True) -> None:
        """The full check of a saved datastore (``rasd datastore verify``): every state's invariants, every
        edge, the document starts and every section's checksum. ValueError naming the first problem."""
        if not self.read_only:
            raise ValueError("check_integrity checks a saved (loaded) datastore file")
        from tqdm.auto import tqdm

        native = self._native
        states = int(native.num_states)
        chunk = 1 << 20
        with tqdm(total=states + 1, desc="check states", unit="state", disable=not progress) as bar:
            for begin in range(0, states, chunk):
                native.check_states(begin, min(states, begin + chunk))
                bar.update(min(chunk, states - begin))
            native.check_sections()
            bar.update(1)

    def info(self) -> dict[str, Any]:
        """Sizes and identity, for ``rasd datastore info``."""
        n = self._native
        out = {
            "tokens": int(n.num_tokens),
            "documents": int(n.num_documents),
            "states": int(n.num_states),
            "edges": int(n.num_edges),
            "read_only": self.read_only,
        }
        if self.read_only:
            out |= {
                "path": str(self._path),
                "format_version": int(n.version),
                "file_bytes": int(n.file_bytes),
                "bytes_per_token": int(n.file_bytes) / max(1, int(n.num_tokens)),
                "tokenizer": n.tokenizer_name,
                "tokenizer_hash": n.tokenizer_hash,
                "tokenizer_full_hash": n.tokenizer_full_hash or "unknown",
                "vocab_size": int(n.vocab_size) or "unknown (saved without a tokenizer)",
            }
        return out


class Matcher:
    """Incremental longest-suffix matching against a datastore: each ``feed`` costs O(tokens fed).

    Remains valid while its (mutable) store grows.
    """

    def __init__(self, store: Datastore) -> None:
        self.store = store
        self._state = 0
        self._length = 0

    @property
    def length(self) -> int:
        """Length of the longest suffix of everything fed so far that occurs in the store."""
        return self._length

    def reset(self) -> None:
        self._state = self._length = 0

    def feed(self, tokens: Any) -> int:
        arr = _as_tokens(tokens, self.store.vocab_size, "context")
        self._state, self._length = self.store._native.feed(self._state, self._length, arr)
        return self._length

    def retrieve(self, max_nodes: int = 64, max_depth: int = 16, **kwargs: Any) -> TokenTree:
        """The retrieval tree at the current match (see :meth:`Datastore.retrieve` for the options)."""
        return self.store._tree(self._state, self._length, max_nodes, max_depth, **kwargs)


# -- building from documents, and the packaged corpora --------------------------------------------------
CORPORA = ("stdlib", "python-docs", "sharegpt", "wikipedia")


def corpus_documents(name: str, limit: int | None = None) -> Iterator[tuple[str, str]]:
    """(id, text) of every document of a packaged corpus: ``stdlib`` (the standard library's Python code),
    ``python-docs`` (reST pages), ``sharegpt`` (whole conversations) or ``wikipedia`` (English summaries);
    the first ``limit`` only when given."""
    from rasd import data

    loaders = {
        "stdlib": lambda: ((d.id, d.text) for d in data.stdlib_code()),
        "python-docs": lambda: ((d.id, d.text) for d in data.python_docs()),
        "sharegpt": lambda: ((c.id, "\n".join(t for _, t in c.messages)) for c in data.sharegpt()),
        "wikipedia": lambda: ((d.id, d.text) for d in data.wikipedia()),
    }
    if name not in loaders:
        raise ValueError(f"unknown corpus {name!r}; choose from {CORPORA}")
    return itertools.islice(loaders[name](), limit)


def _text_of(item: Any, index: int) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, tuple | list) and len(item) == 2 and isinstance(item[1], str):
        return item[1]
    raise TypeError(
        f"document {index} is {type(item).__name__} {str(item)[:60]!r}: documents must be strings or "
        "(id, text) pairs of strings"
    )


def tokenize_documents(
    documents: Iterable[str | tuple[str, str]], tokenizer: Any, batch_size: int = 256
) -> Iterator[list[list[int]]]:
    """Token ids of ``documents`` (plain strings or (id, text) pairs), ``batch_size`` documents per yielded
    batch, without special tokens: the tokens every corpus index is built from."""
    docs = enumerate(documents)
    while batch := list(itertools.islice(docs, batch_size)):
        texts = [_text_of(item, i) for i, item in batch]
        yield tokenizer(texts, add_special_tokens=False)["input_ids"]


def corpus_tag(corpora: Sequence[str], limit: int | None = None) -> str:
    """The cache-file tag of packaged ``corpora`` cut to ``limit`` documents each."""
    return "+".join(corpora) + (f"-{limit}" if limit else "")


def build_datastore(
    documents: Iterable[str | tuple[str, str]],
    tokenizer: Any,
    out: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> Datastore:
    """Tokenize ``documents`` (plain strings or (id, text) pairs; one datastore document each) into a new
    datastore and, when ``out`` is given, save it there (atomically) with the tokenizer's identity. A wrong
    item raises TypeError naming it as soon as it is reached."""
    from tqdm.auto import tqdm

    store = Datastore(vocab_size=len(tokenizer))
    bar = tqdm(desc="tokenize + build", unit="doc", disable=not progress)
    for batch in tokenize_documents(documents, tokenizer):
        for ids in batch:
            if ids:
                store.add(ids)
        bar.update(len(batch))
        bar.set_postfix(tokens=len(store))
    bar.close()
    if not len(store):
        raise ValueError("no text found in the inputs")
    if out is not None:
        store.save(out, tokenizer=tokenizer)
    return store


def ensure_datastore(
    tokenizer_name: str,
    corpora: Sequence[str] = ("stdlib",),
    *,
    limit: int | None = None,
    progress: bool = True,
) -> Path:
    """The path of a cached datastore of packaged ``corpora`` for a registry tokenizer, built on first use
    into ``$RASD_CACHE/datastores`` (each corpus cut to its first ``limit`` documents when given)."""
    import fcntl

    from rasd import models
    from rasd._assets import cache_dir

    path = cache_dir() / "datastores" / f"{tokenizer_name}-{corpus_tag(corpora, limit)}.rasd"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One builder per path across processes: a second caller waits for the first and then finds the file
    # (the save itself is atomic, so a reader never sees a partial file either way).
    with open(path.with_suffix(".rasd.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not path.exists():
            tokenizer = models.load_tokenizer(tokenizer_name)
            docs = itertools.chain.from_iterable(corpus_documents(c, limit) for c in corpora)
            build_datastore(docs, tokenizer, path, progress=progress)
    return path
