#!/usr/bin/env bash
# Installs the Python clients the tests drive lorafleet with (scripts/py/requirements-clients.txt)
# into .venv-clients/ and prints the interpreter's path. Idempotent; exits 3 when they
# cannot be installed (no python3 venv, no PyPI).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY=.venv-clients/bin/python
# Tests call this in parallel: one installs, the others wait for it.
exec 9>.venv-clients.lock
flock 9
if [ ! -x "$PY" ] || ! "$PY" -c "import openai, gguf, numpy, safetensors" 2>/dev/null; then
    echo "installing the Python test clients into .venv-clients/ (scripts/py/requirements-clients.txt)" >&2
    rm -rf .venv-clients
    if ! { python3 -m venv .venv-clients && .venv-clients/bin/pip install -q -r scripts/py/requirements-clients.txt; } >&2; then
        echo "could not install the Python test clients into .venv-clients/" >&2
        exit 3
    fi
fi
echo "$ROOT/$PY"
