"""REST's own retrieval engine as an end-to-end contender (``rest_native`` in bench_e2e).

REST (He et al., 2024) drafts from a suffix array over a corpus with its Rust ``draftretriever``
package (PyPI ``draftretriever==0.1.0``, the REST code base packaged; optional: the contender is
skipped where it does not install). This module wraps it in rasd's :class:`~rasd.drafting.Drafter`
protocol, so that REST's retrieval and ours (``rest``: the C++ suffix automaton) are compared with the
same verifier, planner and corpus, and only the drafter differs.

What REST does, kept as published: query the longest context suffix first among spans 16, 15, ..., 2
and stop at the first span with any match; ``search(..., choices=N)`` returns up to N root-to-node
paths of the trie of the most frequent continuations (padded with -2), which become one tree.
``draftretriever`` aborts the whole process on a one-token query, so spans start at 2, as REST's do.
Observed with this build (tests/test_rest_native.py): some proposed paths follow no suffix of the context
and occur nowhere in the corpus (its suffix array is over bytes, and matches need not start on a token
boundary). Verification makes that harmless for the output; it only costs acceptance.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from rasd.drafting.base import DraftContext, Proposal, StepBudget, StepResult
from rasd.tree import Source, TokenTree

SPANS = tuple(range(16, 1, -1))  # REST's default: max_token_span 16, longest first, at least 2 tokens


def available() -> bool:
    """True when REST's ``draftretriever`` imports here."""
    try:
        import draftretriever  # noqa: F401
    except ImportError:
        return False
    return True


def write_index(documents: Iterable[Sequence[int]], path: str | Path, vocab_size: int) -> Path:
    """Write a ``draftretriever`` index of token-id ``documents`` to ``path`` (via a temporary name, so
    that an interrupted build never leaves a half-written index under the final one)."""
    import draftretriever

    path = Path(path)
    partial = path.with_suffix(path.suffix + ".partial")
    writer = draftretriever.Writer(file_path=str(partial), vocab_size=vocab_size)
    for ids in documents:
        if len(ids):
            writer.add_entry(list(ids))
    writer.finalize()
    del writer  # its destructor writes the file once more: let it, before the rename
    partial.rename(path)
    return path


def ensure_index(tokenizer_name: str, corpora: Sequence[str], limit: int | None) -> Path:
    """A cached ``draftretriever`` index of the same documents and tokens as
    ``rasd.ensure_datastore(tokenizer_name, corpora, limit=limit)``; built on first use."""
    from rasd import models
    from rasd._assets import cache_dir
    from rasd.datastore import corpus_documents, corpus_tag, tokenize_documents

    path = cache_dir() / "draftretriever" / f"{tokenizer_name}-{corpus_tag(corpora, limit)}.idx"
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = models.load_tokenizer(tokenizer_name)
    docs = itertools.chain.from_iterable(corpus_documents(c, limit) for c in corpora)
    token_lists = (ids for batch in tokenize_documents(docs, tokenizer) for ids in batch)
    return write_index(token_lists, path, len(tokenizer))


class DraftRetrieverLookup:
    """:class:`~rasd.drafting.Drafter` over REST's ``draftretriever.Reader`` (nodes tagged CORPUS)."""

    def __init__(self, index: str | Path, *, spans: Sequence[int] = SPANS) -> None:
        import draftretriever

        if not spans or min(spans) < 2:
            raise ValueError("draftretriever aborts the process on one-token queries: spans must be >= 2")
        self.reader = draftretriever.Reader(index_file_path=str(index))
        self.spans = tuple(spans)
        self.tokens: list[int] = []

    def begin(self, context: DraftContext) -> None:
        self.tokens = list(context.prompt)

    def advance(self, step: StepResult) -> None:
        self.tokens.extend(step.tokens)

    def propose(self, budget: StepBudget) -> Proposal:
        start = time.perf_counter()
        tree = TokenTree.empty()
        for span in self.spans if budget.max_nodes > 0 else ():
            if span > len(self.tokens):
                continue
            paths = self.reader.search(self.tokens[-span:], choices=budget.max_nodes)[0]
            if paths:
                tree = paths_to_tree(paths, budget.max_nodes, match_length=span)
                break
        return Proposal(tree, retrieval_seconds=time.perf_counter() - start)


def paths_to_tree(paths: Sequence[Sequence[int]], budget: int, *, match_length: int = 0) -> TokenTree:
    """The trie of ``paths`` (each a continuation of the context; negative ids are padding), in the
    order the nodes first appear, cut to ``budget`` nodes. Node score: how many paths pass through it."""
    index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
    tokens: list[int] = []
    parents: list[int] = []
    counts: list[int] = []
    for path in paths:
        parent = -1
        for token in path:
            if token < 0:
                break
            node = index.get((parent, token))
            if node is None:
                if len(tokens) == budget:
                    break
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                counts.append(0)
            counts[node] += 1
            parent = node
    n = len(tokens)
    return TokenTree(
        np.asarray(tokens, np.int32),
        np.asarray(parents, np.int32),
        scores=np.asarray(counts, np.float32),
        sources=np.full(n, int(Source.CORPUS), np.uint8),
        match_lengths=np.full(n, match_length, np.int32),
    )
