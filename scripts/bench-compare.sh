#!/usr/bin/env bash
# lorafleet against PyTorch + transformers + PEFT (+ bitsandbytes), on this machine's CPU,
# side by side: installs the anchor (pinned, in .venv-bench/, ~3 GB from PyPI) and Rust if
# missing, builds the CLI, then runs every workload on both, interleaved, for --rounds
# rounds, and prints a Markdown table of medians and ratios (tokens/s, peak RSS) with the
# CPU, flags, threads, build profile and versions.
#
#   scripts/bench-compare.sh                    # full set, 3 rounds, release build (~25 min on 2 cores)
#   scripts/bench-compare.sh --profile dev      # the dev build (what `cargo build` gives)
#   scripts/bench-compare.sh --only generate --rounds 5
#   scripts/bench-compare.sh --set quick --rounds 1 --min-ratio 0.5   # the CI guard
#
# Exit status: 0, 1 when a ratio is under --min-ratio, 3 when the anchor cannot be
# installed.
#
# Workloads (bench train / bench generate's model: random Llama, 4 layers, hidden 512,
# vocab 32000, LoRA r=8 on all seven projections): training with f32 weights, NF4 + f32
# compute and NF4 + bf16 compute, gradient checkpointing off and on, sequence 256 and
# 1024; greedy decoding with the KV cache, 128 new tokens, f32 and NF4.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
# shellcheck source=scripts/bench/setup.sh
. scripts/bench/setup.sh "$@"

mkdir -p target/bench
exec .venv-bench/bin/python scripts/bench/compare.py --lorafleet "$bin" \
    --anchor ".venv-bench/bin/python scripts/bench/hf_anchor.py" --profile "$profile" \
    --out target/bench/bench-compare.jsonl "${args[@]}"
