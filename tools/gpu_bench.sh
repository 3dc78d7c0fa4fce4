#!/usr/bin/env bash
# GPU benchmark (issue 8), run on the device machine: moekit and transformers on the same shapes
# in one run — DeepSeek-V2-Lite widths with 4 layers, batch B x S — printing one table:
# prefill tokens/s, training tokens/s with ~10% of the routed experts trainable (moekit) vs
# transformers' best ESFT-like setting (all expert weights trainable: its experts are fused), and
# peak GPU memory (sampled from nvidia-smi every 50 ms while each engine runs alone).
#
#   MOEKIT_BENCH_BIN=path/to/moekit_model_bench bash tools/gpu_bench.sh [LAYERS] [BATCH] [SEQ]
#   (FULL=1: also the full 27-layer V2-Lite: moekit bf16 with activation checkpointing, and
#   transformers' prefill, training attempts and batch-1 decode; MOEKIT_RUNS picks moekit's runs)
#   (MOEKIT_LIB_PATH: LD_LIBRARY_PATH for moekit alone, e.g. carried Debian libraries that must
#   not reach the Python peer)
#
# Writes $OUT/gpu_bench.jsonl (one line per measurement) when OUT is set.
set -uo pipefail
LAYERS=${1:-4}; B=${2:-4}; S=${3:-2048}; ITERS=${ITERS:-3}
BIN=${MOEKIT_BENCH_BIN:-build/bench/moekit_model_bench}
OUT=${OUT:-/tmp/gpu-bench}; mkdir -p "$OUT"
CFG=$OUT/v2-lite-${LAYERS}l.json
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

# moekit runs: fp32 (exact fp32 weights, GEMMs and attention), bf16 (--dtype bf16: frozen
# weights bf16, GEMMs and attention on the bf16 tensor cores), bf16-ckpt (+ activation
# checkpointing).
moekit_run() {  # CONFIG RUN
  local dtype=${2%%-*} ck=
  [ "$2" != "${2%-ckpt}" ] && ck=1
  echo "# moekit $2, $(basename "$1") (prefill, then esft10 training) on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
  with_peak env MOEKIT_BENCH_CHECKPOINT=$ck LD_LIBRARY_PATH="${MOEKIT_LIB_PATH:-${LD_LIBRARY_PATH:-}}" \
    "$BIN" "$1" "$B" "$S" "$ITERS" 16 cuda esft10 "$dtype" | sed "s/^{\"engine\": \"moekit\"/{\"engine\": \"moekit\", \"run\": \"$2\"/"
}
FULL_CFG=configs/deepseek-v2-lite.json
{
  for run in ${MOEKIT_RUNS:-fp32 bf16 bf16-ckpt}; do moekit_run "$CFG" "$run"; done
  [ -n "${FULL:-}" ] && moekit_run "$FULL_CFG" bf16-ckpt
  echo "# transformers"
  with_peak python3 tools/bench_gpu_peer.py --config "$CFG" --layers "$LAYERS" --batch "$B" --seq "$S" --iters "$ITERS" \
    ${FULL:+--full}
} 2>&1 | tee "$OUT/gpu_bench.log"
grep '^{' "$OUT/gpu_bench.log" >"$OUT/gpu_bench.jsonl"
python3 - "$OUT/gpu_bench.jsonl" "$B" "$S" "$LAYERS" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = [r for r in rows if r.get("engine") == "moekit"]
peaks = [r["peak_gpu_gib"] for r in rows if "peak_gpu_gib" in r]
t = {r["bench"]: r for r in rows if "bench" in r}
card = next((r for r in rows if "bf16_gemm_tflops" in r), {})
print(f"\nGPU {card.get('device')}, bf16 GEMM {card.get('bf16_gemm_tflops', 0):.0f} TFLOP/s, batch {sys.argv[2]} x {sys.argv[3]}")
print(f"{'':44} {'prefill tok/s':>14} {'ESFT train tok/s':>17} {'peak GiB':>9}")
for m in ms:
    name = f"moekit {m.get('run')} {m['layers']}L (loss {m['first_loss']:.4f})"
    err = " (training: " + m["train_error"][:60] + ")" if m.get("train_error") else ""
    print(f"{name:44} {m['forward_tok_s']:>14.0f} {m['train_tok_s']:>17.0f} {m.get('peak_device_gib', 0):>9.2f}{err}")
for tag in sorted({k.rsplit('-', 1)[1] for k in t}):
    pre, esft, full = t.get(f"prefill-{tag}", {}), t.get(f"train-esft-{tag}", {}), t.get(f"train-all-{tag}", {})
    for name, tr in (("experts trainable", esft), ("all trainable", full)):
        label = f"transformers {tag} ({name})"
        tok = tr.get("tokens_per_s") or 0
        print(f"{label:44} {pre.get('tokens_per_s', 0) if name.startswith('experts') else 0:>14.0f} {tok:>17.0f} {tr.get('peak_gib', 0):>9.2f} {tr.get('error', '')}")
    if f"decode-{tag}" in t:
        print(f"transformers {tag} batch-1 decode: {t[f'decode-{tag}']['tokens_per_s']:.1f} tok/s")
print("(peak: moekit's allocator high-water mark of live tensors; transformers: torch.cuda.max_memory_allocated;")
print(" nvidia-smi whole-process peaks per engine run: " + ", ".join(f"{p:.1f}" for p in peaks) + " GiB)")
m4 = [m for m in ms if m["layers"] == int(sys.argv[4])]
pre, esft = t.get(f"prefill-{sys.argv[4]}L", {}), t.get(f"train-esft-{sys.argv[4]}L", {})
if m4 and pre.get("tokens_per_s") and esft.get("tokens_per_s"):
    for m in m4:
        print(f"ratio moekit {m.get('run')} / transformers ({sys.argv[4]} layers): prefill {m['forward_tok_s']/pre['tokens_per_s']:.2f}x, "
              f"ESFT training {m['train_tok_s']/esft['tokens_per_s']:.2f}x, peak memory {m.get('peak_device_gib', 0)/esft['peak_gib']:.2f}x")
PY
