#!/usr/bin/env bash
# GPU benchmark (issue 8), run on the device machine: moekit and transformers on the same shapes
# in one run — DeepSeek-V2-Lite widths with 4 layers, batch B x S — printing one table:
# prefill tokens/s, training tokens/s with ~10% of the routed experts trainable (moekit) vs
# transformers' best ESFT-like setting (all expert weights trainable: its experts are fused),
# batch-1 greedy decode tokens/s (a 32-token prompt, then 256 new tokens, the same LAYERS; the
# whole generate call is timed on both sides) and peak GPU memory of the prefill/training run
# (sampled from nvidia-smi every 50 ms while each engine runs alone).
#
#   MOEKIT_BENCH_BIN=path/to/moekit_model_bench bash tools/gpu_bench.sh [LAYERS] [BATCH] [SEQ]
#   (DECODE_ONLY=1: moekit decode only, transformers prefill + decode, no training: e.g. the full
#   27-layer model, `DECODE_ONLY=1 GEMM_MODES="fp32 tf32" bash tools/gpu_bench.sh 27 1 512`)
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

{
  for gemm in ${GEMM_MODES:-fp32 tf32 bf16}; do
    echo "# moekit, F32 GEMMs as $gemm (forward, then esft10 training) on $(nvidia-smi --query-gpu=name --format=csv,noheader)"
    [ -n "${DECODE_ONLY:-}" ] || with_peak env MOEKIT_CUDA_FP32_GEMM=$gemm LD_LIBRARY_PATH="${MOEKIT_LIB_PATH:-${LD_LIBRARY_PATH:-}}" \
      "$BIN" "$CFG" "$B" "$S" "$ITERS" 16 cuda esft10 | sed "s/^{\"engine\": \"moekit\"/{\"engine\": \"moekit\", \"gemm\": \"$gemm\"/"
    echo "# moekit decode, batch 1, F32 GEMMs as $gemm"
    env MOEKIT_CUDA_FP32_GEMM=$gemm LD_LIBRARY_PATH="${MOEKIT_LIB_PATH:-${LD_LIBRARY_PATH:-}}" \
      "$BIN" "$CFG" 1 32 256 16 cuda decode | sed "s/^{\"engine\": \"moekit\"/{\"engine\": \"moekit\", \"gemm\": \"$gemm\"/"
  done
  echo "# transformers"
  with_peak python3 tools/bench_gpu_peer.py --config "$CFG" --layers "$LAYERS" --batch "$B" --seq "$S" --iters "$ITERS" --decode ${DECODE_ONLY:+--no-train}
} 2>&1 | tee "$OUT/gpu_bench.log"
grep '^{' "$OUT/gpu_bench.log" >"$OUT/gpu_bench.jsonl"
python3 - "$OUT/gpu_bench.jsonl" "$B" "$S" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
ms = [r for r in rows if r.get("engine") == "moekit" and r.get("mode") != "decode"]
dec = {r.get("gemm", "fp32"): r["decode_tok_s"] for r in rows
       if r.get("engine") == "moekit" and r.get("mode") == "decode"}
peaks = [r["peak_gpu_gib"] for r in rows if "peak_gpu_gib" in r]
t = {r["bench"]: r for r in rows if "bench" in r}
card = next((r for r in rows if "bf16_gemm_tflops" in r), {})
print(f"\nGPU {card.get('device')}, bf16 GEMM {card.get('bf16_gemm_tflops', 0):.0f} TFLOP/s, batch {sys.argv[2]} x {sys.argv[3]}")
print(f"{'':34} {'prefill tok/s':>14} {'ESFT train tok/s':>17} {'decode tok/s':>13} {'peak GPU GiB':>13}")
for i, m in enumerate(ms):
    name = f"moekit ({m['mode']}, {m.get('gemm', 'fp32')} GEMM; loss {m['first_loss']:.4f})"
    print(f"{name:34} {m['forward_tok_s']:>14.0f} {m['train_tok_s']:>17.0f} {dec.get(m.get('gemm', 'fp32'), 0):>13.1f} {peaks[i] if i < len(peaks) else 0:>13.2f}")
for g, v in dec.items():  # decode-only runs (DECODE_ONLY=1) have no prefill/training row
    if not any(r.get("gemm", "fp32") == g for r in ms):
        print(f"{'moekit (decode, ' + g + ' GEMM)':34} {'':>14} {'':>17} {v:>13.1f} {'':>13}")
m = max(ms, key=lambda r: r["train_tok_s"]) if ms else None
pre = next((v for k, v in t.items() if k.startswith("prefill")), {})
esft = next((v for k, v in t.items() if k.startswith("train-esft")), {})
full = next((v for k, v in t.items() if k.startswith("train-all")), {})
tdec = max([v.get("tokens_per_s", 0) for k, v in t.items() if k.startswith("decode")] or [0])
print(f"{'transformers (experts trainable)':34} {pre.get('tokens_per_s', 0):>14.0f} {esft.get('tokens_per_s', 0):>17.0f} {tdec:>13.1f} {esft.get('peak_gib', 0):>13.2f}")
print(f"{'transformers (all trainable)':34} {'':>14} {full.get('tokens_per_s', 0):>17.0f} {'':>13} {full.get('peak_gib', 0):>13.2f}")
print("(moekit peak: nvidia-smi, whole process; transformers: torch.cuda.max_memory_allocated)")
if m and pre.get("tokens_per_s") and esft.get("tokens_per_s"):
    print(f"ratio, moekit's fastest mode ({m.get('gemm')}) / transformers: prefill {m['forward_tok_s']/pre['tokens_per_s']:.2f}x, "
          f"ESFT training {m['train_tok_s']/esft['tokens_per_s']:.2f}x")
if dec and tdec:
    g = max(dec, key=dec.get)
    print(f"decode (batch 1, 256 new tokens): moekit {dec[g]:.1f} tok/s ({g} GEMM) vs transformers {tdec:.1f} tok/s: {dec[g]/tdec:.2f}x")
for k, v in t.items():
    if "error" in v:
        print(f"transformers {k}: {v['error']}")
PY
