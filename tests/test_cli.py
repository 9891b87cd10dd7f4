"""The command line answers --version/--help and reports errors with a fix, not a traceback."""

import subprocess
import sys
from pathlib import Path

import pytest

import rasd
from rasd import cli


def test_version_flag():
    out = subprocess.run([sys.executable, "-m", "rasd.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0
    assert out.stdout.strip() == f"rasd {rasd.__version__}"


def test_entry_point_help_lists_commands():
    entry_point = Path(sys.executable).parent / "rasd"  # the console script pip installed
    out = subprocess.run([str(entry_point), "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for command in ("demo", "generate", "models", "data"):
        assert command in out.stdout


def test_models_list(capsys):
    assert cli.main(["models", "list"]) == 0
    listing = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b" in listing and "smollm2-135m" in listing


def test_unknown_model_is_a_clear_error(capsys):
    assert cli.main(["models", "install", "no-such-model"]) == 2
    assert "unknown model 'no-such-model'" in capsys.readouterr().err


@pytest.mark.real_model
def test_generate_streams_text_and_stats_identical_to_plain(capsys, tmp_path):
    from rasd.datastore import build_datastore, corpus_documents
    from rasd.models import load_tokenizer

    store = tmp_path / "docs.rasd"
    tokenizer = load_tokenizer("smollm2-135m")
    build_datastore(corpus_documents("python-docs", 50), tokenizer, store, progress=False)
    argv = ["generate", "def add(a, b):", "--model", "smollm2-135m", "--datastore", str(store)]
    assert cli.main([*argv, "--max-new-tokens", "24", "--compare"]) == 0
    out = capsys.readouterr()
    assert len(out.out.strip()) > 10  # the completion itself, streamed to stdout
    assert "24 tokens" in out.err and "mean accepted length" in out.err
    assert "output identical" in out.err


@pytest.mark.real_model
@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "   ", "--model", "smollm2-135m"], "the prompt is empty"),
        (["generate", "x", "--model", "smollm2-135m", "--datastore", "/nope.rasd"], "does not exist"),
        (["generate", "x", "--model", "/no/such/dir"], "unknown model"),
    ],
)
def test_generate_bad_input_is_a_clear_error(capsys, argv, message):
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.real_model
def test_ralm_index_build_and_reload(capsys, tmp_path):
    from rasd.ralmspec import KNNDatastore, load_retriever, questions

    out = tmp_path / "bm25"
    argv = ["ralm", "index", "build", "--kind", "bm25", "--sources", "wikipedia-en", "--limit", "200"]
    assert cli.main([*argv, "--out", str(out)]) == 0
    assert "bm25 index, 200 passages" in capsys.readouterr().out
    ids, _ = load_retriever(out).search(questions(2), 3)
    assert ids.shape == (2, 3) and (ids >= 0).all()
    assert cli.main([*argv, "--out", str(out)]) == 2  # never overwrites an existing index
    assert "not empty" in capsys.readouterr().err

    knn = tmp_path / "knn"
    argv = ["ralm", "index", "build", "--kind", "knnlm", "--model", "smollm2-135m", "--limit", "5"]
    assert cli.main([*argv, "--sources", "python-docs", "--out", str(knn)]) == 0
    assert "knnlm index" in capsys.readouterr().out
    assert len(KNNDatastore.load(knn)) > 100
    assert cli.main(["ralm", "index", "info", str(knn)]) == 0
    assert "knnlm" in capsys.readouterr().out
    with pytest.raises(ValueError, match="KNN-LM datastore"):
        load_retriever(knn)
