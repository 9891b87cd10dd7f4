"""Knowledge bases from the packaged real text: ~100-word passages and questions."""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence

from rasd import data

SOURCES = ("wikipedia-en", "wikipedia-es", "wikipedia-fr", "python-docs")


def split_passages(text: str, words: int = 100, title: str = "") -> Iterator[str]:
    """Consecutive chunks of ``words`` whitespace words (the last may be shorter; tiny tails are dropped),
    each prefixed with ``title`` as DPR-style passages are."""
    tokens = text.split()
    for start in range(0, len(tokens), words):
        chunk = tokens[start : start + words]
        if len(chunk) < 8 and start:
            continue
        yield (f"{title}: " if title else "") + " ".join(chunk)


def passages(sources: Sequence[str] = SOURCES, *, words: int = 100, limit: int | None = None) -> list[str]:
    """Passages of the packaged corpora in a fixed order; ``limit`` cuts the total (a corpus-size knob)."""
    out: list[str] = []
    for source in sources:
        if source.startswith("wikipedia-"):
            lang = {"en": "en-us", "es": "es-es", "fr": "fr-fr"}[source.split("-", 1)[1]]
            docs = [(d.title, d.text) for d in data.wikipedia(lang)]
        elif source == "python-docs":
            docs = [(d.title, re.sub(r"[=\-~^*`]{4,}", " ", d.text)) for d in data.python_docs()]
        else:
            raise ValueError(f"unknown source {source!r}: choose from {', '.join(SOURCES)}")
        for title, text in docs:
            for p in split_passages(text, words, title):
                out.append(p)
                if limit is not None and len(out) >= limit:
                    return out
    return out


def questions(limit: int | None = None) -> list[str]:
    """FanOutQA dev questions, then MT-Bench first turns: real questions, in a fixed order."""
    qs = [q.turns[0] for q in data.fanoutqa("dev")] + [q.turns[0] for q in data.mtbench()]
    return qs[:limit] if limit is not None else qs
