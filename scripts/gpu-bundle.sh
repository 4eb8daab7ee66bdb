#!/usr/bin/env bash
# Pack what scripts/gpu-check.sh needs on a GPU machine that has no Rust toolchain: the
# CUDA builds of lorafleet-worker and lorafleet (scripts/build-cuda.sh) and a release
# lorafleet-coordinator, stripped and xz-compressed into
# target/gpu-bundle/lorafleet-gpu.tar.xz (about 21 MB, small enough to carry to a lent
# GPU machine with the working tree). There:
#   ./scripts/gpu-check.sh          # unpacks the bundle, runs the CUDA checks
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

"$ROOT/scripts/build-cuda.sh"
cargo build --locked --release -p lorafleet-coordinator --target-dir "$ROOT/target/cuda"

OUT="$ROOT/target/gpu-bundle"
rm -rf "$OUT"
mkdir -p "$OUT/stage"
cp target/cuda/release/lorafleet-worker target/cuda/release/lorafleet target/cuda/release/lorafleet-coordinator "$OUT/stage/"
strip "$OUT/stage/"*
tar -cf - -C "$OUT/stage" . | xz -T0 -9 > "$OUT/lorafleet-gpu.tar.xz"
rm -rf "$OUT/stage"
ls -la "$OUT/lorafleet-gpu.tar.xz"
echo "carry target/gpu-bundle to the GPU machine and run ./scripts/gpu-check.sh there"
