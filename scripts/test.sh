#!/usr/bin/env bash
# The whole test suite from a fresh machine: install everything, lint, then run pytest.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
PY=${PYTHON:-python3}
"$PY" -m ruff check rasd tests benchmarks
# The native core under AddressSanitizer + UBSan: its tests, the thread stress test and 60 fuzzer cases
# per mode (about a minute, most of it the sanitized build).
bash scripts/sanitize.sh 60
exec "$PY" -m pytest "$@"
