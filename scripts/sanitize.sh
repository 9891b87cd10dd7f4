#!/usr/bin/env bash
# Builds rasd._core with AddressSanitizer + UndefinedBehaviorSanitizer (build/sanitize) and runs the native
# tests against it: the tree and datastore tests, every small-GEMM kernel against its reference, the thread
# stress test and the format fuzzer (its worker processes load the same build). Any sanitizer report fails
# the run (UBSan does not recover).
#   bash scripts/sanitize.sh            # CI: native tests + 60 fuzzer cases per mode
#   bash scripts/sanitize.sh 2000       # more fuzzer cases
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
CASES=${1:-60}
BUILD=build/sanitize
VERSION=$("$PY" -c "import re; print(re.search(r'\"(.+)\"', open('rasd/_version.py').read()).group(1))")
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=undefined" \
  -DCMAKE_SHARED_LINKER_FLAGS="-fsanitize=address,undefined" \
  -DSKBUILD_PROJECT_VERSION="$VERSION" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" \
  -DPython_EXECUTABLE="$(command -v "$PY")" >/dev/null
cmake --build "$BUILD" >/dev/null
SO=$(ls "$BUILD"/_core*.so)

# Every Python process of the run (pytest and the fuzzer's workers) loads the sanitized build as
# rasd._core before anything imports rasd: a sitecustomize on PYTHONPATH puts it in sys.modules.
OVERLAY=$(mktemp -d)
trap 'rm -rf "$OVERLAY"' EXIT
cat > "$OVERLAY/sitecustomize.py" <<PYEOF
import importlib.util, sys
spec = importlib.util.spec_from_file_location("rasd._core", "$PWD/$SO")
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
sys.modules["rasd._core"] = module
PYEOF
export PYTHONPATH="$OVERLAY${PYTHONPATH:+:$PYTHONPATH}"
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
# Python itself is not built with ASan: its allocations look like leaks at exit; everything else counts.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export RASD_FUZZ_CASES="$CASES"
"$PY" -c "from rasd import _core as c; assert c.__file__.endswith('$SO'), c.__file__; print('sanitized core:', c.__file__)"
"$PY" -m pytest -q -p no:cacheprovider tests/test_core.py tests/test_native_threads.py \
  tests/test_datastore_fuzz.py tests/test_datastore.py tests/test_fastpath.py -m "not real_model" -k "not test_concurrent_saves"
