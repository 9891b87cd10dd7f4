#!/usr/bin/env bash
# The GPU check (issue 22) in one command, sized for the minutes a GPU machine is lent (no network there):
# builds and installs rasd, measures greedy identity, lossless sampling, the verification-cost curve and the
# host-device traffic per step into OUT/gpu.json as it goes (a run cut short keeps what finished), then runs
# the CUDA-marked tests and adds their outcome to the same file.
#
#   bash scripts/gpu-check.sh                  # on a CUDA machine: real shapes, under 8 minutes in all
#   bash scripts/gpu-check.sh --device cpu     # the CPU form: same code, tiny shapes, about a minute
#   bash scripts/gpu-check.sh [--device D] DIR # results in DIR (default: $OUT, else build/gpu-check-D)
#
# Environment: PYTHON (interpreter), GPU_CHECK_BUDGET (seconds for the whole script: 450 on cuda; 240 on
# cpu, a ceiling: the CPU form's fixed work takes about a minute), GPU_CHECK_INSTALL (auto: install only when rasd._core does not import; always; never),
# RASD_COMMIT (recorded in the JSON where the copy of the repository has no .git).
# Files in DIR: gpu.json (the results; copy it to benchmarks/results/gpu.json, then
# `python -m benchmarks report`), install.log, pytest-gpu.log, pytest-gpu.xml.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
DEVICE=cuda
DIR=${OUT:-}
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE=$2; shift 2 ;;
    --device=*) DEVICE=${1#*=}; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    -*) echo "gpu-check: unknown option $1 (see --help)" >&2; exit 2 ;;
    *) DIR=$1; shift ;;
  esac
done
case "$DEVICE" in cuda|cpu) ;; *) echo "gpu-check: --device must be cuda or cpu, got $DEVICE" >&2; exit 2 ;; esac
DIR=${DIR:-build/gpu-check-$DEVICE}
mkdir -p "$DIR"
PY=${PYTHON:-python3}
if [ "$DEVICE" = cuda ]; then BUDGET=${GPU_CHECK_BUDGET:-450}; else BUDGET=${GPU_CHECK_BUDGET:-240}; fi
elapsed() { echo $(( $(date +%s) - START )); }

# 1. Install. Without network: no build isolation, no dependencies, no index. scikit-build-core's editable
# install is the normal path; if it fails (an older scikit-build-core), the core is built with CMake and
# placed next to the sources (*.so is git-ignored), which is all `import rasd` needs from the repo root.
INSTALL=skipped
INSTALL_MODE=${GPU_CHECK_INSTALL:-auto}
if [ "$INSTALL_MODE" = always ] || { [ "$INSTALL_MODE" = auto ] && ! "$PY" -c "import rasd._core" 2>/dev/null; }; then
  echo "[gpu-check] installing rasd (log: $DIR/install.log)"
  if timeout 300 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$DIR/install.log" 2>&1 \
      && "$PY" -c "import rasd._core"; then
    INSTALL=pip-editable
  else
    VERSION=$("$PY" -c "import re; print(re.search(r'\"(.+)\"', open('rasd/_version.py').read()).group(1))")
    if { cmake -S . -B build/gpu-check-core -G Ninja -DCMAKE_BUILD_TYPE=Release -DSKBUILD_PROJECT_VERSION="$VERSION" \
          -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v "$PY")" \
          && cmake --build build/gpu-check-core; } >>"$DIR/install.log" 2>&1; then
      cp build/gpu-check-core/_core*.so rasd/ && INSTALL=cmake-in-tree
    fi
    "$PY" -c "import rasd._core" 2>/dev/null || INSTALL=failed
  fi
  echo "[gpu-check] install: $INSTALL after $(elapsed) s"
  if [ "$INSTALL" = failed ]; then tail -n 30 "$DIR/install.log"; exit 1; fi
fi
INSTALL_SECONDS=$(elapsed)

# 2. The measurements, given all but the tests' share of the budget; a hard timeout 60 s past their own
# deadline, so a hang cannot eat the tests' time (gpu.json keeps every finished phase).
TESTS_SHARE=$(( BUDGET / 5 ))
RUN_SECONDS=$(( BUDGET - $(elapsed) - TESTS_SHARE ))
[ "$RUN_SECONDS" -lt 30 ] && RUN_SECONDS=30
timeout $(( RUN_SECONDS + 60 )) "$PY" -m benchmarks.gpu_check run --device "$DEVICE" --out "$DIR" \
  --seconds "$RUN_SECONDS" --install "$INSTALL" --install-seconds "$INSTALL_SECONDS"
RUN_RC=$?
echo "[gpu-check] measurements: exit $RUN_RC after $(elapsed) s"

# 3. The CUDA-marked tests (skipped cleanly without CUDA), in whatever time is left (at least 60 s).
TEST_SECONDS=$(( BUDGET - $(elapsed) ))
[ "$TEST_SECONDS" -lt 60 ] && TEST_SECONDS=60
mapfile -t GPU_TESTS < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout "$TEST_SECONDS" "$PY" -m pytest -q -m gpu -p no:cacheprovider --junitxml "$DIR/pytest-gpu.xml" \
  "${GPU_TESTS[@]}" >"$DIR/pytest-gpu.log" 2>&1
TEST_RC=$?
tail -n 15 "$DIR/pytest-gpu.log"

"$PY" -m benchmarks.gpu_report finish --out "$DIR" --junit "$DIR/pytest-gpu.xml" --pytest-rc "$TEST_RC" \
  --total-seconds "$(elapsed)"
echo "[gpu-check] done in $(elapsed) s: $DIR/gpu.json"
[ "$RUN_RC" -eq 0 ] && [ "$TEST_RC" -eq 0 ]
