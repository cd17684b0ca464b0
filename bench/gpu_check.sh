#!/usr/bin/env bash
# gpu_check.sh - everything the CUDA backend needs checked on a GPU machine,
# in one go: build (or use prebuilt binaries), the C tests with the GPU cases,
# compute-sanitizer memcheck + racecheck on the CUDA tests, the benchmarks
# (gqmm cuda-bench), the torch peers and the plot. Logs and JSON go to $OUT.
#
#   bench/gpu_check.sh [all|build|test|sanitize|bench|peers|plot|moe|tune|cpu|profile|probe]...
# profile (not in "all"): ncu sections and per-instruction stalls of the gather kernel at
# PROFILE_POINTS (bench/ncu_stalls.py). probe (not in "all"): the tensor cores' rate under the
# wgmma kernel's issue pattern, no memory traffic (bench/wgmma_probe.cu). moe: the seed model step and its levers on CUDA (gqmm bench: each step launched by the host and replayed from a CUDA graph); tune: gqmm tune
# on the seed shapes; cpu: the CPU backend's tests and sweep on this host's
# CPU with every ISA it has (the GPU hosts have AVX-512 BF16/VNNI).
# Env: OUT (default ./out), BUILD (default build-gpu), PREBUILT (a folder with
# gqmm, gqmm_tests (and gqmm_wgmma_probe) built elsewhere: skips the build), REPS (default 20).
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

# summary.txt holds the environment and each step's result; the logs and JSON
# of the steps are archived into results.tar.gz at the end (a lent machine
# returns at most 8 files).
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
    for file in test_cuda test_cuda_moe; do # the kernels, then the MoE layer's chain
      note "compute-sanitizer $tool, $file (quick subset)"
      GQMM_CUDA_TEST_QUICK=1 compute-sanitizer --tool $tool --error-exitcode 3 \
        "$BIN/gqmm_tests" --file $file > "$OUT/sanitize_now.log" 2>&1 &&
        note "$tool clean" || { note "$tool FAILED"; status=1; }
      grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Hazard|Invalid" "$OUT/sanitize_now.log" | head -5
      cat "$OUT/sanitize_now.log" >> "$OUT/sanitize.log" && rm -f "$OUT/sanitize_now.log"
    done
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
if printf "%s\n" "${steps[@]}" | grep -qx profile; then # diagnostic: not part of "all"
  # For each SHAPE:ROWS[:BITS] of PROFILE_POINTS (the packed sweep of `gqmm cuda-bench --sweep
  # ROWS --shape SHAPE --bits BITS`, exactly ROWS rows on every expert, 4-bit unless BITS):
  # ncu's throughput and stall sections of the gather kernel at real clocks, and where its
  # warps wait per SASS instruction (SourceCounters, summarized by bench/ncu_stalls.py).
  for point in ${PROFILE_POINTS:-gate_up:16 down:16 gate_up:64}; do
    shape=${point%%:*} rest=${point#*:} rows=${rest%%:*} bits=4 name=ncu_${point//:/_}
    [[ $rest == *:* ]] && bits=${rest#*:}
    note "ncu $shape, $rows rows per expert, $bits-bit"
    ncu --kernel-name-base demangled -k regex:wg_kernel_fn --launch-count 1 --cache-control all \
      --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
      --section SchedulerStats --section WarpStateStats --section SourceCounters -o "$OUT/$name" \
      "$BIN/gqmm" cuda-bench --shape "$shape" --sweep "$rows" --bits "$bits" --reps 1 > "$OUT/$name.log" 2>&1 &&
      ncu --import "$OUT/$name.ncu-rep" > "$OUT/$name.txt" 2>&1 &&
      ncu --import "$OUT/$name.ncu-rep" --page source --csv --print-source sass > "$OUT/$name.csv" &&
      python3 bench/ncu_stalls.py "$OUT/$name.csv" --top 20 > "$OUT/${name}_stalls.txt" ||
      status=1
    head -3 "$OUT/${name}_stalls.txt"
    rm -f "$OUT/$name.ncu-rep"
  done
fi
if printf "%s\n" "${steps[@]}" | grep -qx probe; then # diagnostic: not part of "all"
  note "wgmma probe"
  "$BIN/gqmm_wgmma_probe" > "$OUT/wgmma_probe.json" 2> "$OUT/wgmma_probe.log" &&
    python3 -c 'import json,sys; [print("%-32s %d CTAs/SM  tensor busy %.2f" % (r["variant"], r["cps"],
      r["tensor_busy"])) for r in json.load(open(sys.argv[1]))["rows"]]' "$OUT/wgmma_probe.json" ||
    status=1
fi
if want moe; then
  note "gqmm bench (seed model step on CUDA, levers, breakdown)"
  "$BIN/gqmm" bench --backend cuda 2>&1 | tee "$OUT/moe.log" || status=1
  # the breakdown, gate_up packed without its gate/up pairing (activation as its own kernel),
  # and the MLX layout (no gqmm_pack copies)
  "$BIN/gqmm" bench --backend cuda --breakdown 2>&1 | tee -a "$OUT/moe.log" || status=1
  "$BIN/gqmm" bench --backend cuda --no-glu 2>&1 | tee -a "$OUT/moe.log" || status=1
  "$BIN/gqmm" bench --backend cuda --no-pack 2>&1 | tee -a "$OUT/moe.log" || status=1
  # The levers table runs 16 model steps; bounded so the archive below always runs. No
  # --breakdown here: its phase events cost ~5% of the step on the device (perf-notes, session 5).
  timeout "${MOE_LEVERS_S:-240}" "$BIN/gqmm" bench --backend cuda --levers --reps 5 \
    --json "$OUT/moe_levers.json" 2>&1 | tee -a "$OUT/moe.log" || status=1
fi
if want tune; then
  for n in 1408 704; do
    note "gqmm tune --backend cuda --N $n"
    GQMM_TUNE_CACHE="${TMPDIR:-/tmp}/gqmm_tune_cache.json" "$BIN/gqmm" tune --backend cuda --N "$n" \
      --json "$OUT/tune-cuda-n$n.json" 2>&1 | tail -12 | tee -a "$OUT/tune.log" || status=1
  done
fi
if want cpu; then
  lscpu | grep -o 'avx512[a-z_0-9]*' | sort -u | tr '\n' ' ' > "$OUT/cpu.log"; echo >> "$OUT/cpu.log"
  for isa in avx512 avx2 portable; do
    note "CPU tests with GQMM_CPU_ISA=$isa"
    GQMM_CPU_ISA=$isa "$BIN/gqmm_tests" --file test_cpu >> "$OUT/cpu.log" 2>&1 &&
      note "cpu $isa PASS" || { note "cpu $isa FAIL"; status=1; }
    GQMM_CPU_ISA=$isa "$BIN/gqmm" verify --backend cpu 2>&1 | tail -1 | tee -a "$OUT/cpu.log"
  done
  if [ -n "${CPU_SWEEP:-}" ]; then
    GQMM_CPU_ISA=avx512 "$BIN/gqmm" sweep --backend cpu --json "$OUT/sweep-cpu-avx512.json" \
      >> "$OUT/cpu.log" 2>&1 || status=1
    GQMM_CPU_ISA=avx512 "$BIN/gqmm" sweep --backend cpu --int8 \
      --json "$OUT/sweep-cpu-avx512-int8.json" >> "$OUT/cpu.log" 2>&1 || status=1
    # the packed layout (gqmm_pack): exact and int8
    GQMM_CPU_ISA=avx512 "$BIN/gqmm" sweep --backend cpu --packed \
      --json "$OUT/sweep-cpu-avx512-packed.json" >> "$OUT/cpu.log" 2>&1 || status=1
    GQMM_CPU_ISA=avx512 "$BIN/gqmm" sweep --backend cpu --packed --int8 \
      --json "$OUT/sweep-cpu-avx512-packed-int8.json" >> "$OUT/cpu.log" 2>&1 || status=1
  fi
fi
note "gpu_check exit $status"
# At most 8 files come back: everything but the summary and the plot goes in one archive.
(cd "$OUT" && tar czf results.tar.gz --exclude results.tar.gz --exclude summary.txt \
  --exclude '*.png' * && find . -maxdepth 1 -type f ! -name results.tar.gz ! -name summary.txt \
  ! -name '*.png' -delete)
exit $status
