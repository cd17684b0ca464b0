#!/usr/bin/env bash
# gpu_check.sh - everything the CUDA backend needs checked on a GPU machine,
# in one go: build (or use prebuilt binaries), the C tests with the GPU cases,
# compute-sanitizer memcheck + racecheck on the CUDA tests, the benchmarks
# (gqmm cuda-bench), the torch peers and the plot. Logs and JSON go to $OUT.
#
#   bench/gpu_check.sh [all|build|test|sanitize|bench|peers|plot]...
# Env: OUT (default ./out), BUILD (default build-gpu), PREBUILT (a folder with
# gqmm and gqmm_tests built elsewhere: skips the build), REPS (default 20).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
BUILD=${BUILD:-build-gpu}
REPS=${REPS:-20}
mkdir -p "$OUT"
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(all)
want() { for s in "${steps[@]}"; do [ "$s" = all ] || [ "$s" = "$1" ] && return 0; done; return 1; }
status=0
note() { echo "== $* ==" | tee -a "$OUT/summary.txt"; }

if [ -n "${PREBUILT:-}" ]; then BIN=$PREBUILT; else BIN=$BUILD; fi

# At most 8 files come back from a lent machine: summary.txt (environment and
# step results), tests.log, sanitize.log, bench.log (bench + peers output),
# gqmm_cuda.json, peers_cuda.json, sweep_cuda.png.
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  nvcc --version | tail -1; } > "$OUT/summary.txt" 2>&1

if want build && [ -z "${PREBUILT:-}" ]; then
  note "build ($BUILD)"
  cmake -S . -B "$BUILD" -DGQMM_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
    cmake --build "$BUILD" -j "$(nproc)" >> "$OUT/build.log" 2>&1 || { note "BUILD FAILED"; exit 1; }
fi
if want test; then
  note "C tests (GPU cases included)"
  "$BIN/gqmm_tests" > "$OUT/tests.log" 2>&1 && note "tests PASS" || { note "tests FAIL"; status=1; }
  tail -5 "$OUT/tests.log"
fi
if want sanitize; then
  for tool in memcheck racecheck; do
    note "compute-sanitizer $tool (quick subset)"
    GQMM_CUDA_TEST_QUICK=1 compute-sanitizer --tool $tool --error-exitcode 3 \
      "$BIN/gqmm_tests" --file test_cuda > "$OUT/sanitize_now.log" 2>&1 &&
      note "$tool clean" || { note "$tool FAILED"; status=1; }
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid" "$OUT/sanitize_now.log" | head -5
    cat "$OUT/sanitize_now.log" >> "$OUT/sanitize.log" && rm -f "$OUT/sanitize_now.log"
  done
fi
if want bench; then
  note "gqmm cuda-bench"
  "$BIN/gqmm" cuda-bench --reps "$REPS" --json "$OUT/gqmm_cuda.json" 2>&1 | tee "$OUT/bench.log" ||
    status=1
fi
if want peers; then
  note "torch peers"
  PYTHONUNBUFFERED=1 python3 bench/peers_cuda.py --reps "$REPS" --json "$OUT/peers_cuda.json" 2>&1 |
    tee -a "$OUT/bench.log" || status=1
fi
if want plot; then
  python3 bench/plot_sweep.py "$OUT/gqmm_cuda.json" "$OUT/peers_cuda.json" -o "$OUT/sweep_cuda.png" ||
    status=1
fi
note "gpu_check exit $status"
exit $status
