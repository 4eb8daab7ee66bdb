# Sourced by the benchmark scripts: installs the anchor (PyTorch + transformers + PEFT +
# bitsandbytes, pinned in scripts/bench/requirements-anchor.txt) into .venv-bench/ when
# missing; exits 3 when it cannot be installed.
if [ ! -x .venv-bench/bin/python ] || ! .venv-bench/bin/python -c "import torch, transformers, peft, bitsandbytes" 2>/dev/null; then
    echo "installing the anchor into .venv-bench/ (scripts/bench/requirements-anchor.txt)" >&2
    if ! { python3 -m venv .venv-bench && .venv-bench/bin/pip install -q -r scripts/bench/requirements-anchor.txt; }; then
        echo "could not install the anchor (PyTorch + PEFT) into .venv-bench/" >&2
        exit 3
    fi
fi
