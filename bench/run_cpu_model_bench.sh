#!/usr/bin/env bash
# CPU model benchmark: moekit vs the same model in PyTorch (Debian python3-torch + OpenBLAS),
# same config, batch, sequence length and thread count, in one run. Prints one table.
# Usage: [CFG=config.json] bench/run_cpu_model_bench.sh [THREADS] [BATCH] [SEQ] [ITERS]
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS=${1:-$(nproc)}; BATCH=${2:-4}; SEQ=${3:-256}; ITERS=${4:-5}
CFG=${CFG:-bench/cpu_bench_config.json}
BUILD_DIR=${BUILD_DIR:-build}
cmake -S . -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build "$BUILD_DIR" -j "$(nproc)" --target moekit_model_bench >/dev/null
echo "libblas.so.3 -> $(readlink -f /usr/lib/x86_64-linux-gnu/libblas.so.3)"
M=$("$BUILD_DIR"/bench/moekit_model_bench "$CFG" "$BATCH" "$SEQ" "$ITERS" "$THREADS")
P=$(OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=$THREADS /usr/bin/python3 bench/peer_torch_model.py "$CFG" "$BATCH" "$SEQ" "$ITERS" "$THREADS")
echo "$M"; echo "$P"
/usr/bin/python3 - "$M" "$P" <<'PY'
import json, sys
m, p = json.loads(sys.argv[1]), json.loads(sys.argv[2])
print(f"{'':10} {'forward tok/s':>14} {'train tok/s':>12} {'peak RSS MiB':>13}")
for r in (m, p):
    print(f"{r['engine'][:10]:10} {r['forward_tok_s']:>14.0f} {r['train_tok_s']:>12.0f} {r['peak_rss_mib']:>13.0f}")
print(f"ratio moekit/pytorch: forward {m['forward_tok_s']/p['forward_tok_s']:.2f}x, "
      f"train {m['train_tok_s']/p['train_tok_s']:.2f}x; peer GEMM {p['gemm_gflops']} GFLOP/s, threads {m['threads']}/{p['threads']}")
PY
