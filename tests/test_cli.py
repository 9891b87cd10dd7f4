"""The command line answers --version/--help and reports errors with a fix, not a traceback."""

import subprocess
import sys
from pathlib import Path

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
