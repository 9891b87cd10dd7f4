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
@pytest.mark.parametrize("emulated", [True, False])
def test_generate_keeps_the_draft_float32_where_16_bit_is_emulated(capsys, monkeypatch, emulated):
    """--dtype bfloat16 loads the target in bf16; the draft too, unless this CPU would emulate it."""
    from rasd import fastpath

    loaded = []

    def spy(name, dtype="float32", device="cpu", load=cli._load_any):
        loaded.append(dtype)
        return load(name, dtype, device)

    monkeypatch.setattr(cli, "_load_any", spy)
    monkeypatch.setattr(fastpath, "emulated_on_this_cpu", lambda dtype: emulated)
    argv = ["generate", "def add(a, b):", "--model", "smollm2-135m", "--draft", "smollm2-135m"]
    with pytest.warns(RuntimeWarning):  # a bf16 target is equal to HF generate only up to near-ties
        assert cli.main([*argv, "--dtype", "bfloat16", "--max-new-tokens", "4"]) == 0
    assert loaded == ["bfloat16", "float32" if emulated else "bfloat16"]
    assert "4 tokens" in capsys.readouterr().err


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


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["generate", "x", "--max-new-tokens", "-1"], "--max-new-tokens must be >= 0"),
        (["generate", "x", "--max-tree-nodes", "-3"], "--max-tree-nodes must be >= 0"),
        (["datastore", "build", "--tokenizer", "no-such-name", "--out", "{tmp}/x.rasd"], "unknown tokenizer"),
        (
            ["datastore", "build", "--tokenizer", "smollm2-135m", "--out", "/no/such/dir/x.rasd"],
            "does not exist",
        ),
        (["datastore", "build", "--tokenizer", "smollm2-135m", "--out", "{tmp}"], "is a directory"),
        (["datastore", "verify", "{tmp}/missing.rasd"], "cannot open datastore"),
        (["datastore", "info", "{tmp}"], "not a regular file"),
    ],
)
def test_cli_errors_exit_nonzero_with_one_line_naming_the_fix(capsys, tmp_path, argv, message):
    """Every error ends with exit status 2 and one line on stderr, no traceback (checked before any model
    is loaded where the arguments alone are wrong)."""
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_refuses_cuda_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert cli.main(["generate", "x", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_datastore_verify_checks_every_state(capsys, tmp_path):
    """`rasd datastore verify` passes a good file and names the problem in a damaged one (a suffix link
    that does not shorten its state, with every checksum recomputed so only the structural check sees it)."""
    import numpy as np

    from rasd import Datastore
    from tests.test_datastore_fuzz import DatastoreFile

    store = Datastore(vocab_size=50)
    rng = np.random.default_rng(0)
    for _ in range(5):
        store.add(rng.integers(0, 50, 40))
    path = tmp_path / "good.rasd"
    store.save(path)
    assert cli.main(["datastore", "verify", str(path)]) == 0
    assert "OK" in capsys.readouterr().out
    damaged = DatastoreFile.read(path)
    link = damaged.array("link")
    s = int(np.flatnonzero(link > 0)[0])
    link[s] = s  # a self-loop: len(link(s)) == len(s)
    damaged.write(tmp_path / "bad.rasd")
    assert cli.main(["datastore", "verify", str(tmp_path / "bad.rasd")]) == 2
    assert "suffix link" in capsys.readouterr().err
