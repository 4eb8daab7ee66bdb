"""The Dockerfiles: hadolint, and the structure the docs promise (targets, non-root user,
HEALTHCHECK, entrypoints). No container engine runs here: the images are not built."""
import re
import subprocess

import pytest

from conftest import DEPLOY, tool

DOCKERFILES = ["Dockerfile", "Dockerfile.gpu"]


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name):
    r = subprocess.run([tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), str(DEPLOY / name)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_hadolint_can_fail(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian\nRUN cd /tmp && apt-get install curl\n")
    r = subprocess.run([tool("hadolint"), "--config", str(DEPLOY / ".hadolint.yaml"), str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "DL3006" in r.stdout


def stages(text):
    """{stage name: its lines} of a Dockerfile."""
    out, cur = {}, None
    for line in text.splitlines():
        m = re.match(r"FROM\s+\S+(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            cur = m.group(1) or f"stage{len(out)}"
            out[cur] = []
        elif cur:
            out[cur].append(line)
    return out


def test_cpu_image_targets():
    text = (DEPLOY / "Dockerfile").read_text()
    st = stages(text)
    assert {"build", "runtime", "coordinator", "worker", "cli", "setup", "all"} <= set(st)
    assert list(st)[-1] == "all", "the default target carries all three binaries"
    assert "cargo build --release --locked" in text
    runtime = "\n".join(st["runtime"])
    assert "USER 10001:10001" in runtime and "useradd --system --uid 10001" in runtime
    coord = "\n".join(st["coordinator"])
    assert "HEALTHCHECK" in coord and "lorafleet-healthcheck" in coord
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "lorafleet-entrypoint", "lorafleet-coordinator"]' in coord
    assert '"lorafleet-worker"]' in "\n".join(st["worker"])
    assert '"lorafleet"]' in "\n".join(st["cli"])


def test_gpu_image():
    text = (DEPLOY / "Dockerfile.gpu").read_text()
    st = stages(text)
    assert "nvidia/cuda:${CUDA_VERSION}-devel-" in text and "nvidia/cuda:${CUDA_VERSION}-runtime-" in text
    assert "--features lorafleet-worker/cuda,lorafleet-cli/cuda" in text and "--locked" in text
    worker = "\n".join(st["worker"])
    assert "USER 10001:10001" in worker and '"lorafleet-worker"]' in worker


def test_image_scripts_are_valid_shell():
    for script in ["docker/entrypoint.sh", "docker/healthcheck.sh", "compose/make-secrets.sh"]:
        subprocess.run(["sh", "-n", str(DEPLOY / script)], check=True)
    r = subprocess.run([tool("shellcheck"), "-s", "sh", *(str(DEPLOY / s) for s in
                        ["docker/entrypoint.sh", "docker/healthcheck.sh", "compose/make-secrets.sh"])],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_entrypoint_reads_the_token_file(tmp_path):
    f = tmp_path / "token"
    f.write_text("lft_secret\n")
    env = {"PATH": "/usr/bin:/bin", "LORAFLEET_TOKEN_FILE": str(f)}
    out = subprocess.run(["sh", str(DEPLOY / "docker/entrypoint.sh"), "sh", "-c", 'printf %s "$LORAFLEET_TOKEN"'],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out == "lft_secret"
    env["LORAFLEET_TOKEN"] = "given"
    out = subprocess.run(["sh", str(DEPLOY / "docker/entrypoint.sh"), "sh", "-c", 'printf %s "$LORAFLEET_TOKEN"'],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out == "given"
