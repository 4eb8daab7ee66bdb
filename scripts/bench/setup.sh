# Sourced by the benchmark scripts after `cd` to the repository: takes `--profile
# dev|release` out of "$@" (default: $profile as set by the caller) leaving the other
# arguments in `args`, installs the anchor (PyTorch + transformers + PEFT + bitsandbytes,
# pinned in scripts/bench/requirements-anchor.txt) into .venv-bench/ when missing (exit 3
# when it cannot be), installs Rust if missing, builds the CLI and sets `bin`.
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --profile) profile="$2"; shift 2 ;;
        --profile=*) profile="${1#*=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done
case "$profile" in dev|release) ;; *) echo "--profile: dev or release, got $profile" >&2; exit 2 ;; esac

if [ ! -x .venv-bench/bin/python ] || ! .venv-bench/bin/python -c "import torch, transformers, peft, bitsandbytes" 2>/dev/null; then
    echo "installing the anchor into .venv-bench/ (scripts/bench/requirements-anchor.txt)" >&2
    if ! { python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -r scripts/bench/requirements-anchor.txt; }; then
        echo "could not install the anchor (PyTorch + PEFT) into .venv-bench/" >&2
        exit 3
    fi
fi

# shellcheck source=scripts/ensure-rust.sh
. scripts/ensure-rust.sh
if [ "$profile" = release ]; then
    cargo build --release -q -p lorafleet-cli
    bin=target/release/lorafleet
else
    cargo build -q -p lorafleet-cli
    bin=target/debug/lorafleet
fi
