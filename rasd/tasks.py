"""Prompts for the four task families rasd is measured on, built from the real data sets (``rasd.data``).

=========  ==========================================================================================
family     prompt
=========  ==========================================================================================
code       a HumanEval problem (function signature + docstring), completed as raw text
docqa      a Python-documentation page excerpt, then a question about it (chat template)
summary    a Python-documentation page excerpt, then "summarize it" (chat template)
chat       an MT-Bench first turn, a ShareGPT first user message, or a FanOutQA question with its
           Wikipedia evidence summaries as context (chat template)
=========  ==========================================================================================

Selection is fixed and documented so results are reproducible: items are ordered by the sha256 of their
id, the first 20 % form the **dev** split (for tuning) and the rest the **test** split (for reported
numbers); ``prompts(family, split, n)`` returns the first ``n`` of a split in that order.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from rasd import data

FAMILIES = ("code", "docqa", "summary", "chat")
SPLITS = ("dev", "test")
DOC_EXCERPT_CHARS = 2400  # about 500-600 tokens of reST: long enough to copy from, short enough for a CPU


@dataclass(frozen=True)
class Prompt:
    """id: stable item id; family: one of FAMILIES; text: the user-visible request; chat: whether the
    prompt is meant to be wrapped in the model's chat template (``render`` does it)."""

    id: str
    family: str
    text: str
    chat: bool

    def render(self, tokenizer: Any) -> list[int]:
        """Token ids of the prompt for ``tokenizer`` (chat template applied when ``chat``)."""
        if not self.chat:
            return tokenizer(self.text).input_ids
        out = tokenizer.apply_chat_template(
            [{"role": "user", "content": self.text}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
        )
        return list(out["input_ids"])


def _order(items: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return sorted(items, key=lambda kv: hashlib.sha256(kv[0].encode()).hexdigest())


def _split(items: list[tuple[str, Any]], split: str) -> list[tuple[str, Any]]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    ordered = _order(items)
    cut = max(1, len(ordered) // 5)
    return ordered[:cut] if split == "dev" else ordered[cut:]


def _doc_excerpts() -> list[tuple[str, data.Document]]:
    # Library reference pages are the document-QA material: long, factual, full of names to copy.
    docs = [d for d in data.python_docs() if d.id.startswith("library/") and len(d.text) > DOC_EXCERPT_CHARS]
    return [(d.id, d) for d in docs]


def _excerpt(doc: data.Document) -> str:
    text = doc.text[:DOC_EXCERPT_CHARS]
    return text[: text.rfind("\n")] if "\n" in text else text


def prompts(family: str, split: str = "test", n: int | None = None) -> list[Prompt]:
    """The first ``n`` prompts of ``family`` in ``split`` (all of them when ``n`` is None)."""
    if family == "code":
        items = _split([(p.task_id, p) for p in data.humaneval()], split)
        out = [Prompt(key, family, p.prompt, chat=False) for key, p in items]
    elif family in ("docqa", "summary"):
        items = _split(_doc_excerpts(), split)
        if family == "docqa":
            ask = (
                "Using only the documentation above, explain what the module provides and show how to use "
                "its main function or class, quoting the relevant names exactly."
            )
        else:
            ask = "Summarize the documentation above in one paragraph."
        out = [Prompt(key, family, f"{_excerpt(doc)}\n\n{ask}", chat=True) for key, doc in items]
    elif family == "chat":
        out = _chat_prompts(split)
    else:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    return out[:n] if n is not None else out


def _chat_prompts(split: str) -> list[Prompt]:
    """Interleave MT-Bench, ShareGPT and FanOutQA(+Wikipedia) so any prefix mixes the three sources."""
    mt = [(f"mtbench/{q.id}", q.turns[0]) for q in data.mtbench()]
    share = [
        (f"sharegpt/{c.id}", c.messages[0][1])
        for c in data.sharegpt(limit=2000)
        if c.messages[0][0] == "user" and 20 <= len(c.messages[0][1]) <= 1200
    ]
    wiki = {d.title: d.text for d in data.wikipedia()}
    fan = []
    for q in data.fanoutqa("dev"):
        evidence = [wiki[t] for t in q.evidence if t in wiki][:2]
        if evidence:
            context = "\n\n".join(e[:1200] for e in evidence)
            fan.append((f"fanoutqa/{q.id}", f"{context}\n\nAnswer using the text above: {q.turns[0]}"))
    sources = [_split(mt, split), _split(share, split), _split(fan, split)]
    out = []
    for i in range(max(len(s) for s in sources)):
        for source in sources:
            if i < len(source):
                key, text = source[i]
                out.append(Prompt(key, "chat", text, chat=True))
    return out
