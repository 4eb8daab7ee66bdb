"""The compose stack's wiring run for real without a container engine: make-secrets.sh
makes the CA, certificates and tokens (with the built lorafleet-coordinator), the
coordinator starts with compose's own flags (TLS, --worker-ca, --auth; a file:// store in
place of SeaweedFS), the image's healthcheck.sh sees it serve, a worker started with
compose's worker flags through the image's entrypoint.sh (LORAFLEET_TOKEN_FILE) registers
over mutual TLS, and /metrics shows it as lorafleet_workers{pool="compose"}.
Needs the debug binaries that `cargo test --workspace` builds (scripts/test.sh runs this
after it) or LORAFLEET_DEPLOY_BIN_DIR, and openssl; skipped without them."""
import os
import shutil
import socket
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DEPLOY, ROOT
from test_compose import compose_config

BIN = Path(os.environ.get("LORAFLEET_DEPLOY_BIN_DIR", ROOT / "target/debug"))
NEEDED = ["lorafleet-coordinator", "lorafleet-worker", "lorafleet"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def env(tmp_path):
    missing = [b for b in NEEDED if not (BIN / b).exists()]
    if missing or not shutil.which("openssl"):
        pytest.skip(f"needs {missing or 'openssl'} (cargo build; apt-get install openssl)")
    return {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RUST_LOG": "warn"}


def make_secrets(env, d):
    owner = f"{os.getuid()}:{os.getgid()}"
    return subprocess.run(["sh", str(DEPLOY / "compose/make-secrets.sh")], capture_output=True, text=True, check=True,
                          env={**env, "SECRETS_DIR": str(d), "LORAFLEET_SECRETS_OWNER": owner}).stdout


def test_secrets_and_the_stack_wiring(env, tmp_path):
    sec = tmp_path / "secrets"
    out = make_secrets(env, sec)
    assert "made ca.crt" in out and "made auth.yaml" in out
    names = {"ca.crt", "ca.key", "coordinator.crt", "coordinator.key", "worker.crt", "worker.key", "auth.yaml", "worker.token", "admin.token"}
    assert names <= {p.name for p in sec.iterdir()}
    before = {n: (sec / n).read_bytes() for n in names}
    assert "made" not in make_secrets(env, sec), "a second run keeps what exists"
    assert before == {n: (sec / n).read_bytes() for n in names}
    for n in ["coordinator.key", "worker.key", "ca.key", "auth.yaml", "worker.token", "admin.token"]:
        assert (sec / n).stat().st_mode & 0o007 == 0, f"{n} is readable by others"
    subprocess.run(["openssl", "verify", "-CAfile", sec / "ca.crt", sec / "coordinator.crt", sec / "worker.crt"], check=True, capture_output=True)
    san = subprocess.run(["openssl", "x509", "-in", sec / "coordinator.crt", "-noout", "-ext", "subjectAltName"],
                         capture_output=True, text=True, check=True).stdout
    assert "DNS:coordinator" in san and "DNS:localhost" in san

    cfg = compose_config()["services"]
    port, mport = free_port(), free_port()

    def local(arg):
        arg = arg.replace("/secrets/", f"{sec}/")
        for flag, value in [("--listen=", f"127.0.0.1:{port}"), ("--metrics-listen=", f"127.0.0.1:{mport}"),
                            ("--db=", tmp_path / "lorafleet.db"), ("--storage=", f"file://{tmp_path}/store"),
                            ("--audit-log=", tmp_path / "audit.jsonl"), ("--coordinator=", f"https://localhost:{port}")]:
            if arg.startswith(flag):
                return f"{flag}{value}"
        return arg

    coord_cmd = [local(a) for a in cfg["coordinator"]["command"]]
    worker_cmd = [local(a) for a in cfg["worker"]["command"]] + [f"--cache={tmp_path}/cache", "--acquire-wait-secs=1"]
    procs = []
    try:
        procs.append(subprocess.Popen(["lorafleet-coordinator", *coord_cmd], env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(tmp_path / "coordinator.log", "w")))
        health = {**env, "LORAFLEET_METRICS_LISTEN": f"127.0.0.1:{mport}"}
        deadline = time.time() + 60
        while subprocess.run(["sh", str(DEPLOY / "docker/healthcheck.sh")], env=health, capture_output=True).returncode != 0:
            assert procs[0].poll() is None, (tmp_path / "coordinator.log").read_text()
            assert time.time() < deadline, "healthcheck.sh never saw the coordinator serve"
            time.sleep(0.5)
        wenv = {**env, "LORAFLEET_TOKEN_FILE": str(sec / "worker.token")}
        wenv.pop("LORAFLEET_TOKEN", None)
        procs.append(subprocess.Popen(["sh", str(DEPLOY / "docker/entrypoint.sh"), "lorafleet-worker", *worker_cmd], env=wenv,
                                      stdout=subprocess.DEVNULL, stderr=open(tmp_path / "worker.log", "w")))
        ctx = ssl.create_default_context(cafile=str(sec / "ca.crt"))
        want = 'lorafleet_workers{device="cpu",pool="compose"} 1'
        deadline = time.time() + 60
        while True:
            body = urllib.request.urlopen(f"https://localhost:{mport}/metrics", context=ctx, timeout=5).read().decode()
            if want in body:
                break
            assert procs[1].poll() is None, (tmp_path / "worker.log").read_text()
            assert time.time() < deadline, f"no {want} in /metrics:\n{body}\n{(tmp_path / 'worker.log').read_text()}"
            time.sleep(0.5)
        cli = {**env, "LORAFLEET_COORDINATOR": f"https://localhost:{port}", "LORAFLEET_CA": str(sec / "ca.crt"),
               "LORAFLEET_TOKEN": (sec / "admin.token").read_text().strip()}
        r = subprocess.run(["lorafleet", "workers"], env=cli, capture_output=True, text=True, timeout=30)
        rows = [line for line in r.stdout.splitlines()[1:] if line.strip()]
        assert r.returncode == 0 and len(rows) == 1 and " yes " in rows[0], r.stdout + r.stderr
        r = subprocess.run(["lorafleet", "workers"], env={**cli, "LORAFLEET_TOKEN": "lft_wrong"}, capture_output=True, text=True, timeout=30)
        assert r.returncode != 0, "the coordinator takes tokens from auth.yaml only"
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
