#!/usr/bin/env bash
# Loss-Free Balancing vs auxiliary-loss balancing vs none, same model, data and token budget.
# Prints a markdown table (final validation loss/perplexity, MaxVio global and per batch, and
# the mean training MaxVio over the second half) for docs/experiments.md.
# Usage: tools/lfb_experiment.sh [STEPS] [OUT_DIR]   (needs corpus/ and a tokenizer.json)
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}; OUT=${2:-runs/lfb}
M=${MOEKIT:-build/moekit}
TOK=${TOKENIZER:-runs/demo/tokenizer.json}
mkdir -p "$OUT"
run() {  # name, extra args
  local name=$1; shift
  [ -f "$OUT/$name/final/model.safetensors" ] && return 0
  rm -rf "$OUT/$name"
  "$M" train --config configs/moekit-demo.json --data corpus --tokenizer "$TOK" --out "$OUT/$name" \
    --steps "$STEPS" --batch 16 --seq 128 --lr 3e-3 --warmup 30 --log-every 10 --eval-every 50 \
    --eval-batches 16 --save-every 1000 --seed 1 "$@" >"$OUT/$name.log"
}
run lfb --balance lfb
run none --balance none
for a in 0.001 0.01 0.1; do run "aux-$a" --balance aux --aux-alpha "$a"; done
echo "| run | val loss | val ppl | MaxVio global (val) | MaxVio batch (val) | train MaxVio (2nd half mean) |"
echo "|---|---:|---:|---:|---:|---:|"
for name in lfb aux-0.001 aux-0.01 aux-0.1 none; do
  f="$OUT/$name/metrics.jsonl"
  last=$(grep val_loss "$f" | tail -1)
  half=$((STEPS / 2))
  tm=$(jq -s "[.[] | select(.step > $half) | .maxvio] | add / length" "$f")
  echo "$last" | jq -r --arg n "$name" --argjson tm "$tm" \
    '"| \($n) | \(.val_loss*1000|round/1000) | \(.val_ppl*100|round/100) | \(.val_maxvio_global*1000|round/1000) | \(.val_maxvio_batch*1000|round/1000) | \($tm*1000|round/1000) |"'
done
