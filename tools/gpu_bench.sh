#!/usr/bin/env bash
# GPU benchmark (issue 8), run on the device machine: moekit and transformers on the same shapes
# in one run, printing one table. DeepSeek-V2-Lite widths with LAYERS layers, batch B x S:
# prefill tokens/s; training tokens/s with ~10% of the routed experts trainable (moekit) vs
# transformers' best ESFT-like setting (all expert weights trainable: its experts are fused) and
# all-trainable; batch-1 greedy decode tokens/s (a 32-token prompt, then 256 new tokens; the whole
# generate call is timed on both sides); peak GPU memory (moekit: its allocator's high-water mark
# of live tensors; transformers: torch.cuda.max_memory_allocated; nvidia-smi whole-process peaks
# are printed too). Prefill and training are timed alike on both sides: two untimed runs, then
# the median of ITERS (default 3).
#
#   MOEKIT_BENCH_BIN=path/to/moekit_model_bench bash tools/gpu_bench.sh [LAYERS] [BATCH] [SEQ]
#   MOEKIT_RUNS   moekit's prefill/training runs (default "fp32 bf16 bf16-ckpt": exact fp32;
#                 --dtype bf16; bf16 + activation checkpointing)
#   FULL_ONLY=1   the full model alone (with FULL=1)
#   PROFILE=1     also one profiled moekit bf16 run: time per model step (MOEKIT_PROFILE)
#   FULL=1        also the full 27-layer V2-Lite: moekit prefill + ESFT training (FULL_RUNS, default
#                 bf16-ckpt) and bf16 decode; transformers prefill, training attempts and decode
#   MOEKIT_LIB_PATH  LD_LIBRARY_PATH for moekit alone (carried Debian libraries that must not
#                 reach the Python peer)
#
# Writes $OUT/gpu_bench.jsonl (one line per measurement) when OUT is set.
set -uo pipefail
LAYERS=${1:-4}; B=${2:-4}; S=${3:-2048}; ITERS=${ITERS:-3}
BIN=${MOEKIT_BENCH_BIN:-build/bench/moekit_model_bench}
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
CFG=$OUT/v2-lite-${LAYERS}l.json
FULL_CFG=configs/deepseek-v2-lite.json
python3 - "$LAYERS" "$CFG" <<'PY'
import json, sys
c = json.load(open("configs/deepseek-v2-lite.json"))
c["num_hidden_layers"] = int(sys.argv[1])
json.dump(c, open(sys.argv[2], "w"))
PY

# Runs "$@" while sampling the GPU's used memory; prints the command's output, then a JSON line
# with the peak in GiB.
with_peak() {
  local f=$OUT/smi.$$; : >"$f"
  (while :; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits >>"$f" 2>/dev/null; sleep 0.05; done) &
  local pid=$!
  "$@"; local rc=$?
  kill $pid 2>/dev/null; wait $pid 2>/dev/null
  echo "{\"peak_gpu_gib\": $(sort -n "$f" | tail -1 | awk '{printf "%.2f", $1/1024}')}"
  return $rc
}

PEER_LAYERS=$LAYERS
[ -n "${FULL_ONLY:-}" ] && PEER_LAYERS=0
moekit() {  # RUN-NAME ARGS...: one moekit_model_bench line, tagged with the run name
  local run=$1; shift
  env LD_LIBRARY_PATH="${MOEKIT_LIB_PATH:-${LD_LIBRARY_PATH:-}}" "$BIN" "$@" |
    sed "s/^{\"engine\": \"moekit\"/{\"engine\": \"moekit\", \"run\": \"$run\"/"
}
# RUN is fp32, bf16, bf16-ckpt (bf16 + activation checkpointing) or bf16-rx (bf16, the MoE
# experts' gate/up recomputed in backward).
moekit_train() {  # CONFIG RUN
  local dtype=${2%%-*}
  if [ "$2" != "${2%-ckpt}" ]; then export MOEKIT_BENCH_CHECKPOINT=1; else unset MOEKIT_BENCH_CHECKPOINT; fi
  if [ "$2" != "${2%-rx}" ]; then export MOEKIT_BENCH_RECOMPUTE_EXPERTS=1; else unset MOEKIT_BENCH_RECOMPUTE_EXPERTS; fi
  echo "# moekit $2, $(basename "$1"): prefill, then esft10 training"
  with_peak moekit "$2" "$1" "$B" "$S" "$ITERS" 16 cuda esft10 "$dtype"
}
moekit_decode() {  # CONFIG DTYPE
  unset MOEKIT_BENCH_CHECKPOINT
  echo "# moekit decode $2, $(basename "$1")"
  moekit "$2" "$1" 1 32 256 16 cuda decode "$2"
}
{
  echo "# $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader)"
  if [ -z "${FULL_ONLY:-}" ]; then
    for run in ${MOEKIT_RUNS:-fp32 bf16 bf16-ckpt}; do moekit_train "$CFG" "$run"; done
    for dtype in fp32 bf16; do moekit_decode "$CFG" "$dtype"; done
  fi
  if [ -n "${PROFILE:-}" ]; then  # where the time goes: one profiled bf16 ESFT run (stderr)
    echo "# moekit bf16 profile, $(basename "$CFG")"
    MOEKIT_PROFILE=1 moekit profile "$CFG" "$B" "$S" 1 16 cuda esft10 bf16 >/dev/null
  fi
  if [ -n "${FULL:-}" ]; then
    for run in ${FULL_RUNS:-bf16-ckpt}; do moekit_train "$FULL_CFG" "$run"; done
    moekit_decode "$FULL_CFG" bf16
  fi
  echo "# transformers"
  # The full config: --layers overrides its depth for the LAYERS-layer model, --full uses all.
  with_peak python3 tools/bench_gpu_peer.py --config "$FULL_CFG" --layers "$PEER_LAYERS" --batch "$B" \
    --seq "$S" --iters "$ITERS" --decode ${FULL:+--full}
} 2>&1 | tee "$OUT/gpu_bench.log"
grep '^{' "$OUT/gpu_bench.log" >"$OUT/gpu_bench.jsonl"
python3 - "$OUT/gpu_bench.jsonl" "$B" "$S" "$LAYERS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = [r for r in rows if r.get("engine") == "moekit" and r.get("mode") != "decode"]
md = [r for r in rows if r.get("engine") == "moekit" and r.get("mode") == "decode"]
peaks = [r["peak_gpu_gib"] for r in rows if "peak_gpu_gib" in r]
t = {r["bench"]: r for r in rows if "bench" in r}
card = next((r for r in rows if "bf16_gemm_tflops" in r), {})
L = int(sys.argv[4])
print(f"\nGPU {card.get('device')}, bf16 GEMM {card.get('bf16_gemm_tflops', 0):.0f} TFLOP/s, batch {sys.argv[2]} x {sys.argv[3]}")
print(f"{'':46} {'prefill tok/s':>14} {'ESFT train tok/s':>17} {'peak GiB':>9}")
for m in ms:
    name = f"moekit {m.get('run')} {m['layers']}L (loss {m['first_loss']:.4f})"
    err = " (training: " + m["train_error"][:70] + ")" if m.get("train_error") else ""
    print(f"{name:46} {m['forward_tok_s']:>14.0f} {m['train_tok_s']:>17.0f} {m.get('train_peak_device_gib', m.get('peak_device_gib', 0)):>9.2f}{err}")
for tag in sorted({k.rsplit('-', 1)[1] for k in t}):
    pre, esft, full = t.get(f"prefill-{tag}", {}), t.get(f"train-esft-{tag}", {}), t.get(f"train-all-{tag}", {})
    print(f"{'transformers ' + tag + ' (experts trainable)':46} {pre.get('tokens_per_s', 0):>14.0f} {esft.get('tokens_per_s') or 0:>17.0f} {esft.get('peak_gib', 0):>9.2f} {esft.get('error', '')}")
    print(f"{'transformers ' + tag + ' (all trainable)':46} {'':>14} {full.get('tokens_per_s') or 0:>17.0f} {full.get('peak_gib', 0):>9.2f} {full.get('error', '')}")
print("batch-1 decode, 32-token prompt + 256 new tokens:")
for m in md:
    print(f"  moekit {m.get('run')} ({m.get('layers', '?')}L): {m['decode_tok_s']:.1f} tok/s")
for k, v in t.items():
    if k.startswith("decode"):
        print(f"  transformers {k}: {v.get('tokens_per_s', 0):.1f} tok/s {v.get('error', '')}")
print("(peak: moekit's allocator high-water mark of live tensors; transformers: torch.cuda.max_memory_allocated;")
print(" nvidia-smi whole-process peaks per engine run: " + ", ".join(f"{p:.1f}" for p in peaks) + " GiB)")
pre, esft = t.get(f"prefill-{L}L", {}), t.get(f"train-esft-{L}L", {})
if pre.get("tokens_per_s") and esft.get("tokens_per_s"):
    for m in ms:
        if m["layers"] == L:
            print(f"ratio moekit {m.get('run')} / transformers ({L} layers): prefill {m['forward_tok_s']/pre['tokens_per_s']:.2f}x, "
                  f"ESFT training {m['train_tok_s']/esft['tokens_per_s']:.2f}x, peak memory {m.get('train_peak_device_gib', m.get('peak_device_gib', 0))/esft['peak_gib']:.2f}x")
PY
