"""deploy/skypilot/worker.yaml parsed and validated by SkyPilot itself (sky.Task, which
checks the task against SkyPilot's task schema; no cloud access), and its scripts by bash
-n and shellcheck."""
import subprocess

import pytest
import yaml

from conftest import DEPLOY, tool

TASK = DEPLOY / "skypilot/worker.yaml"


@pytest.fixture(scope="module")
def sky():
    try:
        import sky
    except ImportError:
        tool("sky")  # fails under CI, else skips
    return sky


def load(sky, cfg):
    return sky.Task.from_yaml_config(cfg, env_overrides=[("LORAFLEET_COORDINATOR", "https://coordinator.example.com:50051")],
                                     secrets_overrides=[("LORAFLEET_TOKEN", "lft_example")])


def test_task_parses(sky):
    cfg = yaml.safe_load(TASK.read_text())
    task = load(sky, cfg)
    accs = sorted(tuple(r.accelerators.items())[0] for r in task.resources)
    assert accs == [("A100", 1), ("H100", 1)]
    assert task.envs["LORAFLEET_COORDINATOR"] == "https://coordinator.example.com:50051"
    token = task.secrets["LORAFLEET_TOKEN"]
    assert getattr(token, "get_secret_value", lambda: token)() == "lft_example"
    assert "--label pool=skypilot" in task.run and '--coordinator "$LORAFLEET_COORDINATOR"' in task.run
    assert "scripts/build-cuda.sh" in task.setup


def test_task_schema_can_fail(sky):
    cfg = yaml.safe_load(TASK.read_text())
    cfg["resource"] = cfg.pop("resources")
    with pytest.raises(Exception, match="resource"):
        load(sky, cfg)


@pytest.mark.parametrize("part", ["setup", "run"])
def test_scripts(part, tmp_path):
    script = tmp_path / f"{part}.sh"
    script.write_text("#!/usr/bin/env bash\n" + yaml.safe_load(TASK.read_text())[part])
    subprocess.run(["bash", "-n", str(script)], check=True)
    r = subprocess.run([tool("shellcheck"), "-s", "bash", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
