#!/usr/bin/env bash
# Device side of tools/device_carry.sh: unpacks the carried Debian files, puts the prebuilt
# binaries where their compiled-in paths expect them, then runs the GPU tests (tools/cuda_check.sh
# on the prebuilt moekit_tests: Cuda*, Gpu*, DeviceCli*) and/or the benchmark against transformers
# (tools/gpu_bench.sh). Results go to $OUT.
#   bash tools/device_run.sh [tests|streams|bench|all|profile|quick|variants|decode|trace|ncu|ncuattn|ncuexpert|sass|gemmbench][,...]   (e.g. tests,decode)
set -uo pipefail
WHAT=${1:-all}
want() { [[ ",$WHAT," == *",$1,"* ]]; }
R=$(pwd); C=$R/.device-carry; OUT=${OUT:-/tmp/out}
mkdir -p /tmp/deps "$OUT"
tar -C /tmp/deps -xJf "$C/deps.tar.xz"
D=/tmp/deps/usr/lib/x86_64-linux-gnu
LIBS=$D:$D/openblas-pthread
# Tests find fixtures and the moekit binary under the source path they were built in.
SRC=$(awk '/^source_dir/ {print $2}' "$C/manifest")
[ -e "$SRC" ] || { mkdir -p "$(dirname "$SRC")"; ln -s "$R" "$SRC"; }
mkdir -p build/bench
cp "$C/moekit" "$C/moekit_tests" build/ && cp "$C/moekit_model_bench" build/bench/
chmod +x build/moekit build/moekit_tests build/bench/moekit_model_bench
rc=0
if want tests || want all; then
  LD_LIBRARY_PATH=$LIBS MOEKIT_PREBUILT=$R/build OUT=$OUT/check timeout "${TESTS_TIMEOUT:-300}" \
    bash tools/cuda_check.sh >"$OUT/check.log" 2>&1
  rc=$?
  echo "GPU tests rc=$rc"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]|^\[ gpu-" "$OUT/check.log" | sort -u | head -40
  # The expert GEMM of our own (MOEKIT_CUDA_EXPERT_GEMM=own, not the default): its op tests again.
  LD_LIBRARY_PATH=$LIBS MOEKIT_CUDA_EXPERT_GEMM=own timeout 120 build/moekit_tests \
    --gtest_filter='CudaBackendTest.ExpertGemm*:CudaBackendTest.GroupedMatmul*:GpuBf16*' \
    >"$OUT/check-own.log" 2>&1
  own=$?
  echo "GPU tests (own expert GEMM) rc=$own"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/check-own.log" | sort -u | head -10
  [ $own -eq 0 ] || rc=$own
fi
if want streams; then  # the GPU tests again with one GEMM per expert on side streams
  LD_LIBRARY_PATH=$LIBS MOEKIT_PREBUILT=$R/build OUT=$OUT/check-streams MOEKIT_CUDA_EXPERT_GEMM=streams \
    MOEKIT_TEST_FILTER='Cuda*:Gpu*' timeout "${TESTS_TIMEOUT:-300}" \
    bash tools/cuda_check.sh >"$OUT/check-streams.log" 2>&1
  echo "GPU tests (streams) rc=$?"
  grep -E "^\[  (PASSED|FAILED) |FAILED  \]" "$OUT/check-streams.log" | sort -u | head -20
fi
if want bench || want all; then
  MOEKIT_LIB_PATH=$LIBS MOEKIT_BENCH_BIN=build/bench/moekit_model_bench OUT=$OUT/bench \
    timeout "${BENCH_TIMEOUT:-480}" bash tools/gpu_bench.sh 4 4 2048 2>&1 | tail -32
fi
if want quick; then  # moekit alone, 4 layers bf16: each expert-GEMM mode, one line each
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  for m in ${QUICK_GEMMS:-grouped streams}; do
    for ckpt in "" 1; do
      LD_LIBRARY_PATH=$LIBS MOEKIT_CUDA_EXPERT_GEMM=$m MOEKIT_BENCH_CHECKPOINT=$ckpt build/bench/moekit_model_bench /tmp/v2-lite-4l.json 4 2048 3 16 cuda esft10 bf16 | sed "s/^{/{\"expert_gemm\": \"$m\", /"
    done
  done
fi
if want variants; then  # moekit alone under each of VARIANT_ENVS: settings joined by commas, "-" none
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  for cfg in ${VARIANT_CFGS:-/tmp/v2-lite-4l.json}; do
    for envs in ${VARIANT_ENVS:--}; do
      # shellcheck disable=SC2046
      env LD_LIBRARY_PATH=$LIBS $(echo "${envs#-}" | tr , ' ') build/bench/moekit_model_bench "$cfg" 4 2048 \
        "${VARIANT_ITERS:-5}" 16 cuda "${VARIANT_MODE:-prefill}" bf16 | sed "s|^{|{\"env\": \"$envs\", |"
    done
  done
fi
if want decode; then  # batch-1 decode: 4 layers fp32 and bf16, the full model bf16; graphs on/off
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  # DECODE_RUNS: "config dtype" pairs; DECODE_ENVS: one environment setting per variant.
  IFS=';' read -ra runs <<<"${DECODE_RUNS:-/tmp/v2-lite-4l.json fp32;/tmp/v2-lite-4l.json bf16;configs/deepseek-v2-lite.json bf16}"
  for run in "${runs[@]}"; do
    set -- $run
    for envs in ${DECODE_ENVS:-MOEKIT_CUDA_GRAPHS=1 MOEKIT_CUDA_GRAPHS=0}; do
      env LD_LIBRARY_PATH=$LIBS "$envs" build/bench/moekit_model_bench "$1" 1 32 256 16 cuda decode "$2" | sed "s/^{/{\"env\": \"$envs\", /"
    done
  done
fi
if want trace; then  # GPU time per kernel (tools/kernel_trace.cpp, CUPTI): decode and ESFT training
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  CUPTI=$(ls /usr/local/cuda/lib64/libcupti.so* 2>/dev/null | head -1)
  [ -n "$CUPTI" ] || CUPTI=$C/libcupti.so.13
  ln -sf "$CUPTI" /tmp/libcupti.so
  nvcc -O2 -shared -Xcompiler -fPIC tools/kernel_trace.cpp -o /tmp/libkernel_trace.so -L/tmp -lcupti
  runs=()  # TRACE_DECODE= or TRACE_TRAIN= (empty) leaves that run out
  [ -n "${TRACE_DECODE-1}" ] && runs+=("${TRACE_DECODE_CFG:-configs/deepseek-v2-lite.json} 1 32 256 16 cuda decode bf16")
  [ -n "${TRACE_TRAIN-1}" ] && runs+=("${TRACE_TRAIN_CFG:-/tmp/v2-lite-4l.json} 4 2048 ${TRACE_ITERS:-2} 16 cuda esft10 bf16")
  # TRACE_PREFILL="CFG..." (space-separated configs): prefills alone (no training), TRACE_ITERS each
  for cfg in ${TRACE_PREFILL-}; do runs+=("$cfg 4 2048 ${TRACE_ITERS:-2} 16 cuda prefill bf16"); done
  for run in "${runs[@]}"; do
    set -- $run
    tag=$(basename "$1" .json)-$7-$8${TRACE_TAG:+-$TRACE_TAG}
    env LD_LIBRARY_PATH=$LIBS:/tmp:$(dirname "$CUPTI") CUDA_INJECTION64_PATH=/tmp/libkernel_trace.so \
      KERNEL_TRACE_OUT=$OUT/trace-$tag.txt ${TRACE_TIMELINE:+KERNEL_TRACE_TIMELINE=$OUT/timeline-$tag.txt} \
      build/bench/moekit_model_bench "$@"
    head -${TRACE_LINES:-45} "$OUT/trace-$tag.txt"
  done
fi
if want sass; then  # SASS of the Hopper attention kernels (carry the object file: SASS_OBJ)
  O=${SASS_OBJ:-build/CMakeFiles/moekit_core.dir/src/ops/cuda/cuda_flash_attention_hopper.cu.o}
  cuobjdump -sass "$O" >"$OUT/sass.txt" 2>&1 || nvdisasm --help >/dev/null 2>&1
  echo "sass rc=$? $(wc -l <"$OUT/sass.txt") lines"
fi
if want ncuattn; then  # Nsight Compute sections of one attention kernel launch (NCU_KERNEL, NCU_SKIP)
  LD_LIBRARY_PATH=$LIBS timeout 300 ncu --kernel-name "regex:${NCU_KERNEL:-flash_attention_hopper}" \
    --launch-skip "${NCU_SKIP:-0}" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section SchedulerStats --section InstructionStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active" \
    build/moekit_tests --gtest_filter=CudaBackendTest.AttentionThroughput >"$OUT/ncu_attn.txt" 2>&1
  echo "ncu rc=$?"
fi
if want ncuexpert; then  # Nsight Compute on one launch of the own expert GEMM (SwiGLU), 4 layers
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  LD_LIBRARY_PATH=$LIBS MOEKIT_CUDA_EXPERT_GEMM=own timeout 300 ncu --kernel-name "regex:expert_gemm_kernel" \
    --launch-skip "${NCU_SKIP:-6}" --launch-count 1 --section SpeedOfLight --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section SchedulerStats --section Occupancy \
    --metrics "sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct,lts__throughput.avg.pct_of_peak_sustained_elapsed,regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    build/bench/moekit_model_bench /tmp/v2-lite-4l.json 4 2048 1 16 cuda esft10 bf16 >"$OUT/ncu_expert.txt" 2>&1
  echo "ncu rc=$?"
  grep -E "Duration|Throughput|gmma|hit_rate|lts__|Stall|stalled_(long|barrier|wait|math|sleep|dispatch|mio|lg|short|membar|branch|no_inst|selected|not_sel)" "$OUT/ncu_expert.txt" | head -60
fi
if want ncu; then  # hardware counters of the decode step's kernels (Nsight Compute), op by op
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  # Graphs off so each kernel is its own launch; skip the prompt and the first steps.
  M=gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,dram__bytes_read.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,launch__grid_size,launch__block_size,launch__registers_per_thread,sm__warps_active.avg.pct_of_peak_sustained_active
  LD_LIBRARY_PATH=$LIBS MOEKIT_CUDA_GRAPHS=0 timeout 300 ncu --clock-control none --metrics "$M" \
    --launch-skip "${NCU_SKIP:-1500}" --launch-count "${NCU_COUNT:-400}" --csv --print-units base \
    build/bench/moekit_model_bench /tmp/v2-lite-4l.json 1 32 64 16 cuda decode bf16 \
    >"$OUT/ncu.csv" 2>"$OUT/ncu.err"
  echo "ncu rc=$?"; tail -3 "$OUT/ncu.err"
  python3 - "$OUT/ncu.csv" <<'EOF'
import csv, sys, collections
lines = open(sys.argv[1]).read().splitlines()
rows = list(csv.reader(lines[next(i for i, l in enumerate(lines) if l.startswith("\"ID\"")):]))
h = rows[0]; ki, mi, vi = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value")
gi, bi = h.index("Grid Size") if "Grid Size" in h else None, h.index("ID")
per = collections.defaultdict(dict)
for r in rows[1:]:
    per[(r[bi], r[ki][:60])][r[mi]] = r[vi]
agg = collections.defaultdict(list)
for (i, k), m in per.items():
    agg[(k, m.get("launch__grid_size"), m.get("launch__block_size"))].append(m)
f = lambda ms, key: sum(float(x.get(key, "0").replace(",", "")) for x in ms) / len(ms)
print("kernel grid block n us dram% MB sm% warps% regs")
for (k, g, b), ms in sorted(agg.items(), key=lambda kv: -f(kv[1], "gpu__time_duration.sum") * len(kv[1])):
    print(k, g, b, len(ms), round(f(ms, "gpu__time_duration.sum") / 1e3, 2),
          round(f(ms, "dram__throughput.avg.pct_of_peak_sustained_elapsed"), 1),
          round(f(ms, "dram__bytes_read.sum") / 1e6, 2),
          round(f(ms, "sm__throughput.avg.pct_of_peak_sustained_elapsed"), 1),
          round(f(ms, "sm__warps_active.avg.pct_of_peak_sustained_active"), 1),
          f(ms, "launch__registers_per_thread"))
EOF
fi
if want gemmbench; then  # which cuBLAS call should run the routed experts' GEMMs
  nvcc -O2 -std=c++17 -arch=sm_90 tools/expert_gemm_bench.cu -lcublas -o /tmp/expert_gemm_bench &&
    for t in ${GEMMBENCH_T:-8192}; do  # tokens: the padding's break-even point
      for skew in ${GEMMBENCH_SKEW:-0}; do  # routing skew (see the bench)
        /tmp/expert_gemm_bench "$t" 64 6 1408 2048 "$skew" && /tmp/expert_gemm_bench "$t" 64 6 2048 1408 "$skew"
      done
    done
fi
if want profile; then  # time per model step, bf16 ESFT: 4 layers, then the full model
  python3 -c 'import json; c = json.load(open("configs/deepseek-v2-lite.json")); c["num_hidden_layers"] = 4; json.dump(c, open("/tmp/v2-lite-4l.json", "w"))'
  for cfg in ${PROFILE_CFGS:-/tmp/v2-lite-4l.json configs/deepseek-v2-lite.json}; do
    echo "# $cfg"
    LD_LIBRARY_PATH=$LIBS MOEKIT_PROFILE=1 MOEKIT_BENCH_CHECKPOINT=${CKPT:-} \
      build/bench/moekit_model_bench "$cfg" 4 2048 "${ITERS:-2}" 16 cuda esft10 bf16 2>&1 | head -40
  done
fi
exit $rc
