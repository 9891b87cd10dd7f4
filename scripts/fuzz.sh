#!/usr/bin/env bash
# The datastore-format fuzzer at scale: N structured mutants (default 5000) per mode (checksums on, off,
# full check), each loaded and queried in worker processes; fails on any crash, hang or (checksums on)
# silently wrong answer. CI runs 150 per mode through the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
RASD_FUZZ_CASES="${1:-5000}" exec "${PYTHON:-python3}" -m pytest tests/test_datastore_fuzz.py -q -s -p no:cacheprovider \
  -k structured
