"""Spec-Bench on this CPU: the six columns the field compares on, every contender side by side.

    python -m benchmarks.bench_specbench --profile quick   # 3 questions per column, 128 new tokens
    python -m benchmarks.bench_specbench --profile full    # 10 questions per column, 256 new tokens
    python -m benchmarks.bench_specbench --profile quick --contenders recycling,rasd --merge
    python -m benchmarks.bench_specbench --profile quick --resume        # continue an interrupted run
    python -m benchmarks.bench_specbench --resummarize                   # tables and chart from the JSON

Questions: Spec-Bench's ``question.jsonl`` (Xia et al., 2024, Apache-2.0), vendored unchanged in
``benchmarks/data/specbench`` with its licence and published leaderboard (or ``--questions-file`` /
``$RASD_SPECBENCH``). Columns: Multi-turn conversation (the 8 MT-Bench
categories, both turns), Translation, Summarization, Question answering, Mathematical reasoning,
Retrieval-augmented generation. Selection (fixed, so runs compare): per column the first ``n`` questions by
``question_id``; Multi-turn takes its categories round-robin in MT-Bench order (the first writing, roleplay,
reasoning, ... question, then the second of each), so 3 questions are writing, roleplay and reasoning and a
longer selection always extends a shorter one.

Prompts: the Qwen2.5-Coder-1.5B-Instruct chat template (``apply_chat_template(add_generation_prompt=True)``,
the template's default system message), greedy. An MT-Bench second turn is [turn 1, the model's own answer
to turn 1, turn 2]: the answer is ``hf_plain``'s (HF ``generate``) decoded without special tokens, and every
contender gets that same second-turn prompt; both turns are timed.

Contenders (``bench_e2e``'s definitions, so both benchmarks measure the same things):

============  ===================================================================================
hf_plain      ``model.generate`` (the baseline of every ratio)
hf_assisted   ``model.generate(assistant_model=draft)`` (HF assisted generation, 0.5B draft)
hf_pld        ``model.generate(prompt_lookup_num_tokens=10)`` (HF prompt lookup)
pld           rasd PromptLookup (prompt + output suffix automaton)
rest          rasd CorpusLookup over a ShareGPT datastore (the corpus Spec-Bench's REST uses for chat)
rest_native   REST's own ``draftretriever`` over the same documents (where it installs, else skipped)
draft         rasd DraftModel only (0.5B draft trees)
recycling     rasd Token Recycling only (the target's own top-k successors; skipped, with the reason, where
              the installed rasd has no ``recycling`` argument)
rasd          rasd Fused: draft + prompt lookup + corpus + recycling (when available)
============  ===================================================================================

For each question the contenders run in rotated order (the rotation advances every turn). Time to first
token (TTFT): an HF streamer passed to every contender's ``generate`` notes when the first new tokens arrive
(its second ``put``: the first one is the prompt). For ``hf_plain`` that is the prefill forward; for the
speculative contenders it is the prefill (the draft's too, where there is one) plus the first drafting and
verification step, whose accepted tokens all arrive in that first put (recorded as ``first_chunk``). The
decode phase is the rest: total minus TTFT, for both sides of every ratio.

Resume and merge: the run checkpoints ``results/NAME.partial.json`` after every question; ``--resume``
continues it (or extends a finished run to more questions, same settings). ``--merge`` adds this run's
contenders to ``results/NAME.json``, replacing the old records of the contenders it reruns; every run keeps
its own ``hf_plain`` records and each contender is paired with the baseline of its own run.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import inspect
import json
import os
import re
import statistics
import time
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from benchmarks import bench_e2e, rest_native
from benchmarks.harness import (
    RESULTS_DIR,
    Summary,
    command_line,
    environment,
    ratio,
    save_figure,
    write_results,
)

COLUMNS = ("multi-turn", "translation", "summarization", "qa", "math_reasoning", "rag")
# Spec-Bench's own column headers (Leaderboard.md), for tables read beside the published ones.
COLUMN_TITLES = {
    "multi-turn": "Multi-turn Conversation",
    "translation": "Translation",
    "summarization": "Summarization",
    "qa": "Question Answering",
    "math_reasoning": "Mathematical Reasoning",
    "rag": "Retrieval-aug. Generation",
    "overall": "Overall",
}
MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")
CONTENDERS = (
    "hf_plain",
    "hf_assisted",
    "hf_pld",
    "pld",
    "rest",
    "rest_native",
    "draft",
    "recycling",
    "rasd",
)
PROFILES = {
    "quick": {"n": 3, "max_new_tokens": 128},
    "full": {"n": 10, "max_new_tokens": 256},
}
CORPUS = ("sharegpt",)
CORPUS_LIMIT = None  # every conversation the packaged file recovers (17,545 with text)
WARMUP_TOKENS = 16  # enough for kernel preparation, cost profiles and first-call allocations
# The JSON rows' and the Markdown table's columns, in order.
ROW_COLUMNS = (
    "column",
    "contender",
    "speed-up",
    "decode speed-up",
    "per-question min",
    "per-question median",
    "accepted/forward",
    "prefill share",
    "TTFT vs hf_plain",
    "tokens/s",
    "identical",
)
QUESTIONS_ENV = "RASD_SPECBENCH"
VENDORED_QUESTIONS = Path(__file__).resolve().parent / "data" / "specbench" / "question.jsonl"


# --------------------------------------------------------------------------------------------- questions


@dataclass(frozen=True)
class Question:
    """id: Spec-Bench's ``question_id``; category: its ``category``; turns: the user turns (1 or 2)."""

    id: int
    category: str
    turns: tuple[str, ...]

    @property
    def column(self) -> str:
        """The Spec-Bench column: ``multi-turn`` for the MT-Bench categories, else the category."""
        return "multi-turn" if self.category in MT_BENCH else self.category


def question_file(path: str | Path | None = None) -> Path:
    """Spec-Bench's ``question.jsonl``: ``path`` (a file or a folder holding it), else ``$RASD_SPECBENCH``,
    else the copy vendored in ``benchmarks/data/specbench`` (so a clone anywhere finds it)."""
    candidates = (
        [Path(path)]
        if path
        else [Path(p) for p in [os.environ.get(QUESTIONS_ENV)] if p] + [VENDORED_QUESTIONS]
    )
    for candidate in candidates:
        if candidate.is_dir():
            candidate = candidate / "question.jsonl"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        "Spec-Bench's question.jsonl was not found at "
        + ", ".join(str(c) for c in candidates)
        + ": pass --questions-file (or set "
        f"${QUESTIONS_ENV}) to a question.jsonl, or restore {VENDORED_QUESTIONS} from git"
    )


def load_questions(path: str | Path) -> list[Question]:
    """Every question of a Spec-Bench ``question.jsonl``, in file order."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            q = json.loads(line)
            out.append(Question(int(q["question_id"]), q["category"], tuple(q["turns"])))
    return out


def select_questions(
    questions: Iterable[Question], n: int, columns: Sequence[str] = COLUMNS
) -> list[Question]:
    """The first ``n`` questions of each column by ``question_id`` (Multi-turn: its MT-Bench categories taken
    round-robin, see the module docstring), interleaved across columns (question 1 of every column, then
    question 2, ...) so that an interrupted run has measured every column."""
    if n < 1:
        raise ValueError(f"n must be >= 1 question per column, got {n}")
    unknown = set(columns) - set(COLUMNS)
    if unknown:
        raise ValueError(f"unknown columns {sorted(unknown)}; choose from {COLUMNS}")
    by_category: dict[str, list[Question]] = {}
    for q in sorted(questions, key=lambda q: q.id):
        by_category.setdefault(q.category, []).append(q)
    per_column: list[list[Question]] = []
    for column in columns:
        if column == "multi-turn":
            lists = [by_category.get(c, []) for c in MT_BENCH]
            ordered = [lst[i] for i in range(max(map(len, lists))) for lst in lists if i < len(lst)]
        else:
            ordered = by_category.get(column, [])
        if len(ordered) < n:
            raise ValueError(f"column {column!r} has {len(ordered)} questions, fewer than n={n}")
        per_column.append(ordered[:n])
    return [qs[i] for i in range(n) for qs in per_column]


def chat_prompt(tokenizer: Any, turns: Sequence[str], answers: Sequence[str]) -> list[int]:
    """Token ids of [user turns[0], assistant answers[0], ..., user turns[-1]] in the chat template, with the
    generation prompt (``len(answers) == len(turns) - 1``)."""
    if len(answers) != len(turns) - 1:
        raise ValueError(f"{len(turns)} user turns need {len(turns) - 1} answers, got {len(answers)}")
    messages = []
    for i, turn in enumerate(turns):
        messages.append({"role": "user", "content": turn})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return list(out["input_ids"])


def answer_text(tokenizer: Any, tokens: Sequence[int]) -> str:
    """The model's answer as the next turn's history: decoded without special tokens (EOS), stripped."""
    return tokenizer.decode(list(tokens), skip_special_tokens=True).strip()


# ---------------------------------------------------------------------------------------------- running


class FirstTokenTimer(BaseStreamer):
    """An HF streamer that notes when the first new tokens arrive. ``generate`` (HF's and rasd's) puts the
    prompt first, then the tokens of each step; ``first`` is ``time.perf_counter()`` at the second put and
    ``first_chunk`` the number of tokens it carried."""

    def __init__(self) -> None:
        self.puts = 0
        self.first: float | None = None
        self.first_chunk = 0

    def put(self, value: torch.Tensor) -> None:
        self.puts += 1
        if self.puts == 2:
            self.first = time.perf_counter()
            self.first_chunk = int(torch.as_tensor(value).numel())

    def end(self) -> None:
        pass


def recycling_unavailable() -> str | None:
    """Why the ``recycling`` contender cannot run with the installed rasd, or None when it can."""
    from rasd.generate import SpeculativeGenerator

    if "recycling" not in inspect.signature(SpeculativeGenerator).parameters:
        return "the installed rasd's SpeculativeGenerator has no `recycling` argument (no Token Recycling)"
    return None


def _counting_forwards(runner: bench_e2e.Runner, model: torch.nn.Module) -> bench_e2e.Runner:
    """``runner`` that also reports how many forward passes of ``model`` it made (``target_forwards``): HF
    ``generate`` exposes no acceptance statistics, but tokens per target forward is the same quantity."""

    def run(ids: list[int], **call: Any) -> tuple[list[int], dict[str, Any]]:
        count = [0]
        handle = model.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
        try:
            tokens, _ = runner(ids, **call)
        finally:
            handle.remove()
        return tokens, {"target_forwards": count[0]}

    return run


@dataclass(frozen=True)
class Setup:
    """What the contenders run on. target/draft: causal LMs sharing ``tokenizer``; store: the corpus
    datastore of ``rest`` and ``rasd``; rest_index: the ``draftretriever`` index of the same documents
    (None: ``rest_native`` is skipped)."""

    target: torch.nn.Module
    draft: torch.nn.Module
    tokenizer: Any
    store: Any
    rest_index: Path | None = None


def make_runners(
    setup: Setup, names: Sequence[str], max_new_tokens: int, recycling: bool
) -> dict[str, bench_e2e.Runner]:
    """One runner per contender: bench_e2e's where it has the contender, plus ``recycling`` and a ``rasd``
    that fuses recycling too (when ``recycling``). HF runners also count the target's forwards."""
    shared = [n for n in names if n in bench_e2e.CONTENDERS and not (n == "rasd" and recycling)]
    runners = bench_e2e.make_runners(
        setup.target,
        setup.draft,
        setup.store,
        setup.tokenizer,
        max_new_tokens,
        shared,
        rest_index=setup.rest_index,
    )
    if "recycling" in names:
        runners["recycling"] = bench_e2e.rasd_runner(
            setup.target, setup.tokenizer, max_new_tokens, recycling=True, prompt_lookup=False
        )
    if "rasd" in names and recycling:
        runners["rasd"] = bench_e2e.rasd_runner(
            setup.target,
            setup.tokenizer,
            max_new_tokens,
            draft=setup.draft,
            datastore=setup.store,
            prompt_lookup=True,
            recycling=True,
        )
    for name in runners:
        if name.startswith("hf_"):
            runners[name] = _counting_forwards(runners[name], setup.target)
    return {name: runners[name] for name in names}


def _eos_ids(model: torch.nn.Module) -> set[int]:
    eos = model.generation_config.eos_token_id
    return set([eos] if isinstance(eos, int) else (eos or []))


def _sha(ids: Sequence[int]) -> str:
    return hashlib.sha256(json.dumps(list(ids)).encode()).hexdigest()[:16]


def run_questions(
    setup: Setup,
    runners: Mapping[str, bench_e2e.Runner],
    questions: Sequence[Question],
    *,
    run_id: int = 0,
    rotation: int = 0,
    done: Collection[int] = (),
    checkpoint: Callable[[list[dict[str, Any]]], None] | None = None,
    log: Callable[[str], None] = lambda line: print(line, flush=True),
) -> list[dict[str, Any]]:
    """Run every contender on every turn of ``questions`` (skipping the ids in ``done``) and return one
    record per (question, turn, contender). ``rotation``: where the order rotation starts (it advances
    every turn, skipped questions included, so a resumed run keeps the order a full run had).
    ``checkpoint`` is called with the records so far after every question."""
    names = list(runners)
    if "hf_plain" not in names:
        raise ValueError(
            "hf_plain must run: it is every ratio's baseline and the second turn follows its answer"
        )
    eos = _eos_ids(setup.target)
    records: list[dict[str, Any]] = []
    for q in questions:
        answers: list[str] = []
        for turn, _ in enumerate(q.turns):
            order = names[rotation % len(names) :] + names[: rotation % len(names)]
            rotation += 1
            if q.id in done:
                continue
            ids = chat_prompt(setup.tokenizer, q.turns[: turn + 1], answers)
            outputs: dict[str, list[int]] = {}
            for name in order:
                gc.collect()
                timer = FirstTokenTimer()
                load = os.getloadavg()[0]  # other processes on this machine slow every contender alike
                start = time.perf_counter()
                tokens, stats = runners[name](ids, streamer=timer)
                seconds = time.perf_counter() - start
                if timer.first is None:
                    raise RuntimeError(f"{name} streamed no new token for question {q.id} turn {turn + 1}")
                outputs[name] = bench_e2e._strip_eos(tokens, eos)
                records.append(
                    {
                        "run": run_id,
                        "column": q.column,
                        "category": q.category,
                        "question": q.id,
                        "turn": turn + 1,
                        "contender": name,
                        "prompt_tokens": len(ids),
                        "prompt_sha": _sha(ids),
                        "seconds": seconds,
                        "ttft": timer.first - start,
                        "first_chunk": timer.first_chunk,
                        "tokens": len(outputs[name]),
                        "stats": stats,
                        "loadavg": load,
                    }
                )
                log(
                    f"{q.column:14} q{q.id:<4} t{turn + 1} {name:12} {len(ids):5d}+{len(tokens):3d} tok "
                    f"{seconds:7.2f} s (ttft {timer.first - start:6.2f} s)"
                )
            for r in records[-len(names) :]:
                r["identical"] = outputs[r["contender"]] == outputs["hf_plain"]
            answers.append(answer_text(setup.tokenizer, outputs["hf_plain"]))
        if checkpoint is not None and q.id not in done:
            checkpoint(records)
    return records


# ------------------------------------------------------------------------------------------ summarizing


@dataclass(frozen=True)
class QuestionTotals:
    """One contender on one question, its turns added up. decode = seconds - ttft per turn, summed."""

    seconds: float
    ttft: float
    decode: float
    tokens: int
    turns: int
    identical: int
    steps: tuple[int, ...]  # rasd: tokens committed per target forward, every step of every turn
    forwards: int | None  # HF: target forward passes (None: not counted)


def question_totals(records: Iterable[Mapping[str, Any]]) -> dict[tuple[int, str, int, str], QuestionTotals]:
    """(run, column, question, contender) -> its :class:`QuestionTotals`."""
    groups: dict[tuple[int, str, int, str], list[Mapping[str, Any]]] = {}
    for r in records:
        groups.setdefault((r.get("run", 0), r["column"], r["question"], r["contender"]), []).append(r)
    out = {}
    for key, recs in groups.items():
        stats = [r["stats"] or {} for r in recs]
        counted = [s["target_forwards"] for s in stats if "target_forwards" in s]
        out[key] = QuestionTotals(
            seconds=sum(r["seconds"] for r in recs),
            ttft=sum(r["ttft"] for r in recs),
            decode=sum(r["seconds"] - r["ttft"] for r in recs),
            tokens=sum(r["tokens"] for r in recs),
            turns=len(recs),
            identical=sum(bool(r["identical"]) for r in recs),
            steps=tuple(t for s in stats for t in s.get("tokens_per_step", ())),
            forwards=sum(counted) if len(counted) == len(recs) else None,
        )
    return out


def _accepted(mine: Sequence[QuestionTotals]) -> float | None:
    steps = [t for q in mine for t in q.steps]
    if steps:
        return sum(steps) / len(steps)
    if mine and all(q.forwards for q in mine):
        return sum(q.tokens for q in mine) / sum(q.forwards for q in mine)
    return None


def summarize(payload: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One row per (column, contender) and an ``overall`` row per contender.

    Per column, paired per question with ``hf_plain`` of the same run (turns added up): ``speed-up`` =
    total baseline seconds / total contender seconds; ``decode speed-up`` the same over the decode phase
    (seconds - TTFT, per turn); ``per-question min/median``: the spread of the per-question end-to-end
    ratios; ``accepted/forward``: tokens committed per target forward (rasd: over all steps; HF: new tokens
    / target forwards, prefill included, since HF's prefill forward commits the first token);
    ``prefill share``: the contender's own TTFT / total seconds (for ``hf_plain``: how much of the baseline
    speculation cannot touch); ``TTFT vs hf_plain``: its total TTFT / the baseline's; ``identical``: turns
    token-identical to ``hf_plain``. Overall: the mean of the columns for ratios and shares (each column
    weighs the same, as in Spec-Bench's table), min/median over every question, identical counts summed.
    """
    totals = question_totals(payload["records"])
    base = {(run, col, q): t for (run, col, q, name), t in totals.items() if name == "hf_plain"}
    columns = [c for c in payload.get("columns", COLUMNS) if any(k[1] == c for k in totals)]
    rows: list[dict[str, Any]] = []
    per: dict[tuple[str, str], dict[str, Any]] = {}
    ratios: dict[str, list[float]] = {}
    for column in columns:
        for name in payload["contenders"]:
            keys = sorted(k for k in totals if k[1] == column and k[3] == name)
            if not keys:
                continue
            mine = [totals[k] for k in keys]
            theirs = [base[k[:3]] for k in keys]
            per_q = [ratio(b.seconds, m.seconds) for b, m in zip(theirs, mine, strict=True)]
            ratios.setdefault(name, []).extend(per_q)
            spread = Summary.of(per_q)
            row = {
                "column": column,
                "contender": name,
                "speed-up": ratio(sum(b.seconds for b in theirs), sum(m.seconds for m in mine)),
                "decode speed-up": ratio(sum(b.decode for b in theirs), sum(m.decode for m in mine)),
                "per-question min": spread.min,
                "per-question median": spread.median,
                "accepted/forward": _accepted(mine),
                "prefill share": sum(m.ttft for m in mine) / sum(m.seconds for m in mine),
                "TTFT vs hf_plain": sum(m.ttft for m in mine) / sum(b.ttft for b in theirs),
                "tokens/s": sum(m.tokens for m in mine) / sum(m.seconds for m in mine),
                "identical": f"{sum(m.identical for m in mine)}/{sum(m.turns for m in mine)}",
                "questions": len(keys),
            }
            per[(column, name)] = row
            rows.append(row)
    for name in payload["contenders"]:
        mine_rows = [per[(c, name)] for c in columns if (c, name) in per]
        if not mine_rows:
            continue
        spread = Summary.of(ratios[name])
        counts = [r["identical"].split("/") for r in mine_rows]
        accepted = [r["accepted/forward"] for r in mine_rows]
        rows.append(
            {
                "column": "overall",
                "contender": name,
                **{
                    k: statistics.fmean(r[k] for r in mine_rows)
                    for k in ("speed-up", "decode speed-up", "prefill share", "TTFT vs hf_plain", "tokens/s")
                },
                "per-question min": spread.min,
                "per-question median": spread.median,
                "accepted/forward": statistics.fmean(accepted) if None not in accepted else None,
                "identical": f"{sum(int(a) for a, _ in counts)}/{sum(int(b) for _, b in counts)}",
                "questions": sum(r["questions"] for r in mine_rows),
                "columns": len(mine_rows),
            }
        )
    return rows


def goals(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] = COLUMNS) -> list[dict[str, Any]]:
    """Issue 21's goals, each with whether it is met and the measured gap (``detail``)."""
    cell = {(r["column"], r["contender"]): r for r in rows}
    cols = [c for c in columns if (c, "rasd") in cell]
    out = []

    def add(goal: str, met: bool | None, detail: str) -> None:
        out.append({"goal": goal, "met": met, "detail": detail})

    if not cols:
        add("rasd was measured", False, "no rasd rows")
        return out
    misses = []
    for c in cols:
        others = {
            n: r["decode speed-up"]
            for (col, n), r in cell.items()
            if col == c and n not in ("rasd", "hf_plain")
        }
        if others:
            best = max(others, key=others.get)
            mine = cell[(c, "rasd")]["decode speed-up"]
            if mine < others[best]:
                misses.append(f"{c}: rasd {mine:.2f}x < {best} {others[best]:.2f}x")
    add(
        "rasd has the best decode-phase speed-up of all contenders in every column",
        not misses,
        "; ".join(misses) or "best in " + ", ".join(cols),
    )
    mean_decode = statistics.fmean(cell[(c, "rasd")]["decode speed-up"] for c in cols)
    add(
        "rasd's decode-phase speed-up, mean over columns, >= 2.5x",
        mean_decode >= 2.5,
        f"{mean_decode:.2f}x" + ("" if mean_decode >= 2.5 else f" ({2.5 - mean_decode:.2f}x short)"),
    )
    low_cols = [
        f"{c} {cell[(c, 'rasd')]['speed-up']:.2f}x" for c in cols if cell[(c, "rasd")]["speed-up"] < 1.0
    ]
    low_q = [
        f"{c} {cell[(c, 'rasd')]['per-question min']:.2f}x"
        for c in cols
        if cell[(c, "rasd")]["per-question min"] < 1.0
    ]
    lowest = min(cell[(c, "rasd")]["per-question min"] for c in cols)
    detail = [f"lowest single question {lowest:.2f}x"]
    if low_cols:
        detail.append("columns below 1.0x: " + ", ".join(low_cols))
    if low_q:
        detail.append("slowest question per column, where below 1.0x: " + ", ".join(low_q))
    add(
        "rasd end to end never below 1.0x in any column or for any single question",
        not low_cols and not low_q,
        "; ".join(detail),
    )
    # Measured only with recycling and both HF rivals in the run (without a rival no loss can be found).
    missing = [n for n in ("recycling", "hf_pld", "hf_assisted") if not any((c, n) in cell for c in cols)]
    if missing:
        add(
            "recycling alone beats HF prompt lookup and HF assisted generation in every column",
            None,
            ", ".join(missing) + " not run",
        )
    else:
        losses = []
        for c in cols:
            rec = cell.get((c, "recycling"))
            for rival in ("hf_pld", "hf_assisted"):
                if rec and (c, rival) in cell and rec["speed-up"] <= cell[(c, rival)]["speed-up"]:
                    losses.append(
                        f"{c}: {rec['speed-up']:.2f}x <= {rival} {cell[(c, rival)]['speed-up']:.2f}x"
                    )
        add(
            "recycling alone beats HF prompt lookup and HF assisted generation in every column (end to end)",
            not losses,
            "; ".join(losses) or "ahead in every column",
        )
    non_identical = [
        f"{r['column']}/{r['contender']} {r['identical']}"
        for r in rows
        if r["column"] != "overall" and r["identical"].split("/")[0] != r["identical"].split("/")[1]
    ]
    add(
        "all outputs token-identical to HF greedy",
        not non_identical,
        ", ".join(non_identical) or "all identical",
    )
    return out


# ---------------------------------------------------------------------------------------------- outputs


def plot(
    payload: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], name: str, out_dir: Path | None = None
) -> Path:
    """One panel per column and one for overall: end-to-end and decode-phase speed-up per contender."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    panels = [c for c in [*payload.get("columns", COLUMNS), "overall"] if any(r["column"] == c for r in rows)]
    names = [n for n in payload["contenders"] if n != "hf_plain"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), sharey=True)
    x = np.arange(len(names))
    for ax, column in zip(axes.flat, panels, strict=False):
        cell = {r["contender"]: r for r in rows if r["column"] == column}
        e2e = [cell[n]["speed-up"] if n in cell else np.nan for n in names]
        dec = [cell[n]["decode speed-up"] if n in cell else np.nan for n in names]
        ax.bar(x - 0.2, e2e, 0.4, label="end to end")
        ax.bar(x + 0.2, dec, 0.4, label="decode phase")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(x, names, rotation=60, fontsize=7)
        ax.set_title(COLUMN_TITLES[column], fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    axes.flat[0].set_ylabel("speed-up over HF generate")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(
        f"Spec-Bench on CPU: Qwen2.5-Coder-1.5B target, 0.5B draft, {payload['max_new_tokens']} new tokens, "
        f"{payload['n']} question(s) per column, greedy"
    )
    return save_figure(fig, name, out_dir)


def pivot(
    rows: Sequence[Mapping[str, Any]], metric: str, fmt: Callable[[Any], str] = lambda v: f"{v:.2f}x"
) -> list[dict[str, str]]:
    """``metric`` of every contender (a row each) in every column plus overall (a column each, headed with
    Spec-Bench's column titles): the layout of Spec-Bench's leaderboard. Missing cells print as "-"."""
    columns = [c for c in [*COLUMNS, "overall"] if any(r["column"] == c for r in rows)]
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    cell = {(r["column"], r["contender"]): r.get(metric) for r in rows}
    return [
        {"contender": name}
        | {COLUMN_TITLES[c]: "-" if cell.get((c, name)) is None else fmt(cell[(c, name)]) for c in columns}
        for name in contenders
    ]


_LEADERBOARD_KEYS = {
    "models": "system",
    "multi-turn conversation": "multi-turn",
    "translation": "translation",
    "summarization": "summarization",
    "question answering": "qa",
    "mathematical reasoning": "math_reasoning",
    "retrieval-aug. generation": "rag",
    "#mean accepted tokens": "accepted",
    "overall": "overall",
}


def _cell(text: str) -> str:
    text = re.sub(r"\[(.+)\]\([^)]*\)", r"\1", text)  # [name](link) -> name (names hold brackets)
    return re.sub(r"[^\w.\-\[\]#% ]", "", text.replace("**", "")).strip()  # bold, medal emoji


def _default_leaderboard() -> list[dict[str, Any]]:
    try:
        return published_leaderboard(question_file().with_name("Leaderboard.md"))
    except FileNotFoundError:
        return []


def published_leaderboard(path: str | Path) -> list[dict[str, Any]]:
    """The tables of Spec-Bench's ``Leaderboard.md`` (published GPU results): one dict per table with
    ``device`` (e.g. "A100"), ``model`` (e.g. "Vicuna-7B-v1.3") and ``rows`` (``system``, the six column ids,
    ``accepted``, ``overall``, as printed there). Empty when the file is absent."""
    path = Path(path)
    if not path.is_file():
        return []
    tables: list[dict[str, Any]] = []
    device = model = ""
    lines = path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith("## Leaderboard on "):
            device, model = line.removeprefix("## Leaderboard on ").strip(), ""
        elif line.startswith("### "):
            model = line[4:].strip()
        elif line.startswith("- Experimental Settings") and (m := re.search(r"Vicuna-[\w.-]+", line)):
            model = m.group(0).rstrip(",")
        elif line.startswith("| Models"):
            keys = [
                _LEADERBOARD_KEYS.get(_cell(h).replace("Summa-rization", "Summarization").lower(), _cell(h))
                for h in line.strip("|").split("|")
            ]
            rows = []
            i += 2  # the header's separator line
            while i < len(lines) and lines[i].strip().startswith("|"):
                cells = [_cell(c) for c in lines[i].strip().strip("|").split("|")]
                rows.append(dict(zip(keys, cells, strict=False)))
                i += 1
            tables.append({"device": device, "model": model, "rows": rows})
            continue
        i += 1
    return tables


def _write(name: str, payload: dict[str, Any], out_dir: Path, command: str | None, env: Any = None) -> None:
    rows = summarize(payload)
    body = {k: v for k, v in payload.items() if k not in ("rows", "goals", "environment", "command")}
    write_results(
        name,
        body | {"rows": rows, "goals": goals(rows, payload.get("columns", COLUMNS))},
        rows,
        columns=ROW_COLUMNS,
        title=f"Spec-Bench ({payload['profile']}: {payload['n']} questions per column, "
        f"{payload['max_new_tokens']} new tokens, greedy)",
        out_dir=out_dir,
        command=command,
        env=env,
    )
    plot(payload, rows, name, out_dir)


# ------------------------------------------------------------------------------------------------- main


def _settings(payload: Mapping[str, Any]) -> tuple[Any, ...]:
    return (
        payload["max_new_tokens"],
        tuple(payload["corpus"]),
        payload["corpus_limit"],
        tuple(payload["columns"]),
    )


def load_setup(need_store: bool, need_index: bool) -> Setup:
    """The Qwen target and draft, the ShareGPT datastore and (where draftretriever installs) its index."""
    from rasd import models
    from rasd.datastore import Datastore, ensure_datastore

    target, tokenizer = models.load_model(models.DEFAULT_TARGET)
    draft, _ = models.load_model(models.DEFAULT_DRAFT)
    store = None
    if need_store:
        store = Datastore.load(
            ensure_datastore(models.DEFAULT_TARGET, CORPUS, limit=CORPUS_LIMIT), tokenizer=tokenizer
        )
    index = rest_native.ensure_index(models.DEFAULT_TARGET, CORPUS, CORPUS_LIMIT) if need_index else None
    return Setup(target, draft, tokenizer, store, index)


def run(
    args: argparse.Namespace,
    setup_factory: Callable[[bool, bool], Setup] = load_setup,
    out_dir: Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume, or merge) per ``args``; write ``NAME.json``/``.md``/``.png``; return the payload."""
    out_dir = out_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    final, partial = out_dir / f"{args.name}.json", out_dir / f"{args.name}.partial.json"
    profile = PROFILES[args.profile]
    n = args.n or profile["n"]
    columns = args.columns.split(",")
    asked = set(args.contenders.split(","))
    if asked - set(CONTENDERS):
        raise SystemExit(
            f"unknown contenders {sorted(asked - set(CONTENDERS))}; choose from {', '.join(CONTENDERS)}"
        )
    names = [c for c in CONTENDERS if c in asked | {"hf_plain"}]
    skipped: dict[str, str] = {}
    reason = recycling_unavailable()
    if reason and "recycling" in names:
        skipped["recycling"] = reason
        names.remove("recycling")
    if "rest_native" in names and not rest_native.available():
        skipped["rest_native"] = "REST's draftretriever is not installed (pip install draftretriever==0.1.0)"
        names.remove("rest_native")
    for k, v in skipped.items():
        print(f"{k} skipped: {v}", flush=True)
    path = question_file(args.questions_file)
    every = load_questions(path)
    questions = select_questions(every, n, columns)
    payload: dict[str, Any] = {
        "profile": args.profile,
        "n": n,
        "max_new_tokens": args.max_new_tokens or profile["max_new_tokens"],
        "columns": columns,
        "questions": {c: [q.id for q in questions if q.column == c] for c in columns},
        "selection": "first n per column by question_id; multi-turn round-robin over " + ", ".join(MT_BENCH),
        "chat_template": "tokenizer.apply_chat_template(add_generation_prompt=True), default system message",
        "corpus": list(CORPUS),
        "corpus_limit": CORPUS_LIMIT,
        "contenders": names,
        "skipped": skipped,
        "rasd_fuses_recycling": reason is None,
        "published": published_leaderboard(path.with_name("Leaderboard.md")) or _default_leaderboard(),
        "runs": [],
        "records": [],
    }
    done: set[int] = set()
    run_id = 0
    if args.resume:
        source = partial if partial.exists() else final
        if not source.exists():
            raise SystemExit(f"--resume: neither {partial} nor {final} exists")
        old = json.loads(source.read_text())
        run_id = old["runs"][-1]["id"]
        if _settings(old) != _settings(payload) or old["runs"][-1]["contenders"] != names:
            raise SystemExit(
                f"--resume: {source.name}'s last run had other settings (max_new_tokens, corpus, columns or "
                "contenders): start a new run, or --merge"
            )
        last_turn = {q.id: len(q.turns) for q in questions}
        finished: dict[int, set[str]] = {}
        for r in old["records"]:
            if r["run"] == run_id and r["turn"] == last_turn.get(r["question"]):
                finished.setdefault(r["question"], set()).add(r["contender"])
        done = {q for q, who in finished.items() if who >= set(names)}
        # A question interrupted between its turns is rerun whole: drop what it had.
        payload["records"] = [r for r in old["records"] if r["run"] != run_id or r["question"] in done]
        payload["runs"] = old["runs"]
        payload["skipped"] = old.get("skipped", {}) | skipped
        print(f"resuming run {run_id} from {source.name}: {len(done)} question(s) already done", flush=True)
    elif args.merge:
        if not final.exists():
            raise SystemExit(f"--merge: {final} does not exist (run without --merge first)")
        old = json.loads(final.read_text())
        if _settings(old) != _settings(payload) or old["questions"] != payload["questions"]:
            raise SystemExit(f"--merge: {final.name} has other settings or questions; a merge needs the same")
        rerun = set(names) - {"hf_plain"}
        kept = [r for r in old["records"] if r["contender"] not in rerun]
        live = {r["run"] for r in kept if r["contender"] != "hf_plain"}  # runs that still pair a contender
        payload["records"] = [r for r in kept if r["run"] in live]
        payload["runs"] = [r for r in old["runs"] if r["id"] in live]
        payload["skipped"] = {k: v for k, v in old.get("skipped", {}).items() if k not in rerun} | skipped
        run_id = max((r["id"] for r in old["runs"]), default=-1) + 1
    if not args.resume:
        payload["runs"].append({"id": run_id, "contenders": names, "sessions": []})
    payload["contenders"] = [
        c for c in CONTENDERS if c in names or any(r["contender"] == c for r in payload["records"])
    ]
    payload["skipped"] = {k: v for k, v in payload["skipped"].items() if k not in payload["contenders"]}
    session = {
        "command": command,
        "git_commit": environment()["git_commit"],
        "started": time.strftime("%FT%T%z"),
    }
    next(r for r in payload["runs"] if r["id"] == run_id)["sessions"].append(session)

    setup = setup_factory(bool({"rest", "rasd"} & set(names)), "rest_native" in names)
    runners = make_runners(setup, names, payload["max_new_tokens"], recycling=reason is None)
    # Warm-up on 64 tokens of a question outside every selection (the file's last), a few new tokens each.
    warm = chat_prompt(setup.tokenizer, [every[-1].turns[0]], [])[:64]
    for name in names:
        runners[name](warm, max_new_tokens=WARMUP_TOKENS)

    # Everything alive now (models, tokenizer, datastore) lives to the end: keep it out of the collections
    # that run between contenders (a full collection over it took 0.2-0.4 s each here).
    gc.freeze()
    earlier = list(payload["records"])

    def checkpoint(records: list[dict[str, Any]]) -> None:
        partial.write_text(json.dumps(payload | {"records": earlier + records}) + "\n")

    torch.manual_seed(0)
    new = run_questions(setup, runners, questions, run_id=run_id, done=done, checkpoint=checkpoint)
    payload["records"] = earlier + new
    _write(args.name, payload, out_dir, command)
    partial.unlink(missing_ok=True)
    return payload


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--contenders", default=",".join(CONTENDERS), help="hf_plain is always run")
    parser.add_argument("--columns", default=",".join(COLUMNS))
    parser.add_argument("--n", type=int, default=None, help="questions per column (overrides the profile)")
    parser.add_argument("--max-new-tokens", type=int, default=None)
    parser.add_argument("--name", default="specbench", help="result file name in benchmarks/results/")
    parser.add_argument(
        "--questions-file", default=None, help=f"Spec-Bench question.jsonl (or ${QUESTIONS_ENV})"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--resume", action="store_true", help="continue NAME.partial.json (or extend NAME.json)"
    )
    mode.add_argument("--merge", action="store_true", help="add these contenders' records to NAME.json")
    mode.add_argument(
        "--resummarize",
        action="store_true",
        help="run nothing: recompute NAME.json's table, goals and chart from its records",
    )
    args = parser.parse_args(argv)
    command = command_line("benchmarks.bench_specbench", argv)
    if args.resummarize:
        payload = json.loads((RESULTS_DIR / f"{args.name}.json").read_text())
        _write(args.name, payload, RESULTS_DIR, payload.get("command"), env=payload["environment"])
    else:
        run(args, command=command)
    print((RESULTS_DIR / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
