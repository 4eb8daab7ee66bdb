#!/usr/bin/env bash
# The complete demo on one machine, CPU only, nothing downloaded at run time:
#   1. build lorafleet (installs Rust with rustup first if cargo is missing),
#   2. write the deterministic random demo base model (models/demo),
#   3. start `lorafleet dev` (coordinator + one CPU worker + file storage in .lorafleet/),
#   4. submit examples/faq.yaml and watch it train,
#   5. fetch the finished PEFT adapter and ask the fine-tuned model a question.
# Takes a few minutes after the first build (which takes longer: candle compiles slowly).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# shellcheck source=scripts/ensure-rust.sh
. "$ROOT/scripts/ensure-rust.sh"

echo "==> building lorafleet"
cargo build --locked -p lorafleet-cli
LF="$ROOT/target/debug/lorafleet"

PORT="${LORAFLEET_DEMO_PORT:-50071}"
export LORAFLEET_COORDINATOR="http://127.0.0.1:$PORT"

[ -f models/demo/model.safetensors ] || "$LF" demo-model --out models/demo

echo "==> starting lorafleet dev on $LORAFLEET_COORDINATOR"
rm -rf .lorafleet/demo
"$LF" dev --dir .lorafleet/demo --listen "127.0.0.1:$PORT" 2> .lorafleet-demo.log &
DEV=$!
trap 'kill -INT $DEV 2>/dev/null; wait $DEV 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    "$LF" workers --json 2>/dev/null | grep -q '"name"' && break
    kill -0 $DEV 2>/dev/null || { cat .lorafleet-demo.log; exit 1; }
    sleep 0.2
done

echo "==> submitting examples/faq.yaml"
JOB=$("$LF" submit examples/faq.yaml --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
echo "job $JOB"
"$LF" watch "$JOB"

echo "==> fetching the adapter"
rm -rf out/demo-adapter
"$LF" fetch "$JOB" -o out/demo-adapter

Q="How do I reset my password?"
echo "==> asking the fine-tuned model: $Q"
"$LF" generate --model models/demo --adapter out/demo-adapter --prompt "$Q" --max-new-tokens 48
