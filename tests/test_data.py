"""The data loaders read the real packaged data sets."""

import pytest

from rasd import data


def test_humaneval():
    problems = data.humaneval()
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0"
    assert "def " in problems[0].prompt and problems[0].canonical_solution.strip()


def test_mtbench():
    questions = data.mtbench()
    assert len(questions) == 80
    assert all(len(q.turns) == 2 for q in questions)
    assert {q.category for q in questions} >= {"writing", "coding", "math"}


def test_sharegpt_recovers_records_from_the_truncated_file():
    conversations = list(data.sharegpt())
    # 17,671 records decode before the cut; those without any non-empty known-role message are skipped.
    assert 17_000 < len(conversations) <= 17_671
    assert all(c.messages for c in conversations)
    assert {role for c in conversations[:200] for role, _ in c.messages} <= {"user", "assistant", "system"}
    assert len(list(data.sharegpt(limit=5))) == 5


@pytest.mark.parametrize("language,count", [("en-us", 10_033), ("es-es", 6_239), ("fr-fr", 9_955)])
def test_wikipedia(language, count):
    docs = data.wikipedia(language)
    assert len(docs) == count
    assert all(d.text for d in docs[:50])


def test_wikipedia_rejects_unknown_language():
    with pytest.raises(ValueError, match="language"):
        data.wikipedia("de-de")


def test_fanoutqa_has_answers_and_evidence_titles():
    questions = data.fanoutqa("dev")
    assert len(questions) == 310
    assert all(q.answer and q.evidence for q in questions)
    titles = {d.title for d in data.wikipedia()}
    covered = sum(t in titles for q in questions for t in q.evidence)
    assert covered >= 500  # models.md: 558 evidence titles are among the summaries


def test_python_docs():
    docs = data.python_docs()
    assert len(docs) == 497
    assert any(d.id == "library/functions.rst.txt" for d in docs)


def test_stdlib_code():
    files = list(data.stdlib_code(max_files=50))
    assert len(files) == 50
    assert all(not f.id.startswith("site-packages") for f in files)
    assert any("def " in f.text for f in files)
