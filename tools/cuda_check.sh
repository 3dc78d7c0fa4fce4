#!/usr/bin/env bash
# Builds moekit with the CUDA backend on a GPU machine and runs the GPU tests: every op against the
# CPU backend (tests/ops/test_cuda_*.cpp, Cuda*), the whole model on the GPU against the CPU
# (tests/model/test_gpu_model.cpp, Gpu*) and `--device cuda` on the CLI (tests/cli/
# test_device_cli.cpp, GpuCli* and DeviceCli*). Writes nvidia-smi's report, the build and test logs
# and a timing summary to $OUT (default ./cuda-check-out).
#
#   bash tools/cuda_check.sh                      # from the repository root
#   MOEKIT_SRC=DIR bash tools/cuda_check.sh       # build another checkout (e.g. a carried copy)
#   MOEKIT_PREBUILT=DIR bash tools/cuda_check.sh  # no build: run DIR/moekit_tests (built
#                                                 # elsewhere with CUDA; DIR/lib holds its
#                                                 # non-system shared libraries)
#   MOEKIT_SANITIZE=1 bash tools/cuda_check.sh    # then the tests under compute-sanitizer
#                                                 # (SANITIZE_TOOLS picks: default all three;
#                                                 # SANITIZE_FILTER: a gtest filter)
#                                                 # (memcheck, racecheck, synccheck)
#   MOEKIT_TEST_FILTER=PATTERN bash tools/cuda_check.sh  # another gtest filter
#
# The CLI tests run the `moekit` binary at the path compiled into moekit_tests (the build tree);
# with MOEKIT_PREBUILT, put it there (and the sources at the compiled-in source path).
#
# Needs nvcc, CMake >= 3.25 and moekit's build dependencies (scripts/setup) unless
# MOEKIT_PREBUILT is set. Exit status: the test binary's (0 when every selected test passed).
set -uo pipefail

SRC=${MOEKIT_SRC:-$(pwd)}
OUT=${OUT:-$SRC/cuda-check-out}
BUILD=${MOEKIT_BUILD:-/tmp/moekit-cuda-build}
JOBS=${JOBS:-$(nproc)}
mkdir -p "$OUT"
export PATH=/usr/local/cuda/bin:$PATH
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", b - a }'; }
log() { echo "cuda_check: $*" | tee -a "$OUT/summary.txt"; }

: >"$OUT/summary.txt"
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || log "nvidia-smi failed"
head -20 "$OUT/nvidia-smi.txt"
log "nvcc: $(nvcc --version 2>/dev/null | tail -1)"

if [ -n "${MOEKIT_PREBUILT:-}" ]; then
  TESTS=$MOEKIT_PREBUILT/moekit_tests
  export LD_LIBRARY_PATH=$MOEKIT_PREBUILT/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
  log "using prebuilt $TESTS"
else
  GEN=()
  command -v ninja >/dev/null && GEN=(-G Ninja)
  t0=$(now)
  cmake "${GEN[@]}" -S "$SRC" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_WERROR=ON -DMOEKIT_CUDA=ON \
    -DMOEKIT_BENCH=OFF ${CMAKE_ARGS:-} >"$OUT/configure.log" 2>&1 || {
    log "configure failed (see configure.log)"
    tail -30 "$OUT/configure.log"
    exit 3
  }
  t1=$(now)
  cmake --build "$BUILD" -j"$JOBS" --target moekit_tests >"$OUT/build.log" 2>&1 || {
    log "build failed (see build.log)"
    grep -E -m 30 "error|Error" "$OUT/build.log"
    exit 4
  }
  t2=$(now)
  log "configure $(secs "$t0" "$t1") s, build $(secs "$t1" "$t2") s"
  TESTS=$BUILD/moekit_tests
fi

FILTER=${MOEKIT_TEST_FILTER:-Cuda*:Gpu*:DeviceCli*}
t3=$(now)
"$TESTS" --gtest_filter="$FILTER" 2>&1 | tee "$OUT/tests.log"
rc=${PIPESTATUS[0]}
t4=$(now)
log "tests: exit $rc in $(secs "$t3" "$t4") s"
grep -E "^\[ +(OK|FAILED|SKIPPED) +\]|^\[ gpu-" "$OUT/tests.log" | tee -a "$OUT/summary.txt"

if [ "${MOEKIT_SANITIZE:-0}" = 1 ]; then
  # The throughput test is left out: it only times, and the sanitizers slow kernels many-fold;
  # the CLI tests too: their GPU work runs in child processes, which the sanitizer does not see.
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck synccheck}; do
    t5=$(now)
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$TESTS" \
      --gtest_filter="${SANITIZE_FILTER:-Cuda*:Gpu*:-*Throughput:GpuCli*}" >"$OUT/$tool.log" 2>&1
    src=$?
    log "$tool: exit $src in $(secs "$t5" "$(now)") s: $(grep -E 'SUMMARY' "$OUT/$tool.log")"
    [ "$src" = 0 ] || rc=$src
  done
fi
exit "$rc"
