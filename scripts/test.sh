#!/usr/bin/env bash
# The whole test suite from a fresh machine: install everything, lint, then run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check rasd tests benchmarks
exec "$PY" -m pytest "$@"
