#!/usr/bin/env bash
# ESFT vs full fine-tuning on CPU: same base model, task data, batch and sequence length; one
# child process per method so each peak RSS is its own. Prints step time, tokens/s, trainable
# parameters, gradient + AdamW memory and peak RSS per method, and the ratios.
# Usage: bench/run_esft_bench.sh [BASE_MODEL_DIR] [STEPS] [BATCH] [SEQ]
#   BASE_MODEL_DIR defaults to runs/demo/pretrain/final (from `moekit demo`).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${1:-runs/demo/pretrain/final}; STEPS=${2:-30}; BATCH=${3:-4}; SEQ=${4:-256}
BUILD_DIR=${BUILD_DIR:-build-cpu}  # CPU-only build: a CUDA build maps cuBLAS into every process
OUT=${OUT:-runs/esft-bench}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DMOEKIT_CUDA=OFF >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target moekit >/dev/null
[ -f corpus/train.jsonl ] || bash scripts/corpus corpus >/dev/null
"$BUILD_DIR"/moekit esft experiment --model "$BASE" --corpus corpus --out "$OUT" \
  --tasks license --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --max-eval 20 >/dev/null
echo "base $BASE, $STEPS steps of $BATCH x $SEQ tokens, $(nproc) threads, $(date -u +%F)"
jq -r '.tasks[0].methods[] | select(.method != "base") |
  [.method, (.step_seconds*1000|floor), (.tokens_per_s|floor), .trainable_params,
   (.grad_adamw_mib*100|floor/100), (.peak_rss_mib|floor)] | @tsv' "$OUT/results.json" |
  awk 'BEGIN { printf "%-11s %9s %8s %10s %14s %9s\n", "method", "step ms", "tok/s",
               "trainable", "grad+AdamW MiB", "peak MiB" }
       { printf "%-11s %9d %8d %10d %14.2f %9d\n", $1, $2, $3, $4, $5, $6;
         ms[$1] = $2; rss[$1] = $6; st[$1] = $5 }
       END { printf "full / esft-token: step time %.2fx, grad+AdamW %.1fx, peak RSS %.2fx\n",
             ms["full"] / ms["esft-token"], st["full"] / st["esft-token"],
             rss["full"] / rss["esft-token"] }'
