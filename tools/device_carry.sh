#!/usr/bin/env bash
# Packs what a GPU run needs into .device-carry/ (git-ignored), because the device machine has
# CUDA but not Debian's -dev packages: the prebuilt binaries from BUILD_DIR (a CUDA build made
# here) and the files of the Debian packages they link or build against. Then, with the `run`
# tool: command `bash tools/device_run.sh [tests|bench|all]`, carry [".device-carry"].
#   BUILD_DIR=build bash tools/device_carry.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${BUILD_DIR:-build}
C=.device-carry
PKGS="libfmt9 libfmt-dev libopenblas0-pthread libopenblas-pthread-dev libopenblas-dev libpcre2-8-0
      libpcre2-dev libgfortran5 libquadmath0 nlohmann-json3-dev libcli11-dev libgtest-dev
      pkgconf libpkgconf3"
rm -rf "$C" && mkdir -p "$C"
# shellcheck disable=SC2086
dpkg -L $PKGS 2>/dev/null | while read -r f; do [ -f "$f" ] || [ -L "$f" ] && echo "${f#/}"; done |
  sort -u >"$C/files.txt"
tar -C / -cJf "$C/deps.tar.xz" -T "$C/files.txt"
for b in moekit moekit_tests bench/moekit_model_bench; do
  [ -x "$BUILD_DIR/$b" ] || { echo "device_carry: $BUILD_DIR/$b missing (build with CUDA first)" >&2; exit 2; }
  cp "$BUILD_DIR/$b" "$C/"
done
# CUPTI for tools/kernel_trace.cpp, in case the device's toolkit lacks it.
cp -L /usr/local/cuda/lib64/libcupti.so.13 "$C/" 2>/dev/null || true
echo "source_dir $(pwd)" >"$C/manifest"
du -sh "$C"
