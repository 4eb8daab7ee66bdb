#!/usr/bin/env bash
# `lorafleet serve` (continuous batching, many adapters) against Hugging Face `generate`
# + PEFT (sequential) on the demo model and four adapters trained here, side by side in
# one run: throughput and time to first token for 1, 8 and 32 concurrent streams over 1
# and 4 adapters, --rounds rounds interleaved (scripts/bench/serve_bench.py). Installs
# the anchor (.venv-bench/, as scripts/bench-compare.sh) and Rust if missing.
#
#   scripts/bench-serve.sh                   # dev build, 3 rounds, 64 new tokens
#   scripts/bench-serve.sh --profile release --rounds 5
set -euo pipefail
cd "$(dirname "$0")/.."

profile=dev
# shellcheck source=scripts/bench/setup.sh
. scripts/bench/setup.sh "$@"

work=target/bench/serve
mkdir -p "$work"
[ -f "$work/demo/model.safetensors" ] || "$bin" demo-model --out "$work/demo" >/dev/null
adapters=()
for seed in 1 2 3 4; do
    out="$work/adapter-$seed"
    if [ ! -f "$out/adapter_model.safetensors" ]; then
        sed -e "s#source: ./models/demo#source: $work/demo#" -e "s#train: ./examples/faq.json#train: examples/faq.json#" \
            -e "s#dir: ./out/faq#dir: $out#" -e "s#seed: 42#seed: $seed#" -e "s#max_steps: 250#max_steps: 150#" \
            examples/faq.yaml > "$work/spec-$seed.yaml"
        echo "training adapter $seed (demo model, FAQ data, seed $seed)" >&2
        "$bin" train "$work/spec-$seed.yaml" >/dev/null
    fi
    adapters+=("$out")
done
python3 -c 'import json; print(json.dumps(["<human>: " + r["question"] + "\n<assistant>:" for r in json.load(open("examples/faq.json"))]))' > "$work/prompts.json"
cpu=$(grep -m1 "model name" /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')
echo "**$(date +%F)**, CPU: $cpu ($(nproc) logical cores), lorafleet $profile build, $(.venv-bench/bin/python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")')"
echo
exec .venv-bench/bin/python scripts/bench/serve_bench.py --lorafleet "$bin" --model "$work/demo" --adapters "${adapters[@]}" \
    --prompts "$work/prompts.json" "${args[@]}"
