"""Shared fixtures. Real models are loaded once per test session (the Qwen pair needs ~12 GB; never
load one twice in a process)."""

from __future__ import annotations

import functools

import pytest
import torch

from rasd import models
from rasd._assets import AssetError

torch.set_num_threads(max(1, torch.get_num_threads()))


@functools.cache
def _load(name: str):
    try:
        return models.load_model(name)
    except AssetError as exc:  # a test machine set up without `rasd models install` fails loudly
        pytest.fail(f"{name} is not available: {exc}")


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct, fp32, CPU."""
    return _load("smollm2-135m")


@pytest.fixture(scope="session")
def qwen_draft():
    """(model, tokenizer) of Qwen2.5-Coder-0.5B-Instruct, fp32, CPU."""
    return _load("qwen2.5-coder-0.5b")


@pytest.fixture(scope="session")
def qwen_target():
    """(model, tokenizer) of Qwen2.5-Coder-1.5B-Instruct, fp32, CPU (slow tests only)."""
    return _load("qwen2.5-coder-1.5b")
