"""The Helm chart, without a cluster: it lints and renders with Helm's own engine for the
default values and each value set in deploy/helm/pdserve/ci/; every rendered manifest
validates against the Kubernetes schemas (kubernetes-validate), the RayCluster against the
schema we ship for KubeRay's CRD with its pod templates as Pods; bad values are refused by
values.schema.json with a message naming the field."""

import json
from pathlib import Path

import pytest
import yaml

helm = pytest.importorskip("helm_python")
kubernetes_validate = pytest.importorskip("kubernetes_validate")
jsonschema = pytest.importorskip("jsonschema")

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "pdserve"
RAYCLUSTER_SCHEMA = CHART.parent / "schemas" / "raycluster-ray.io-v1-kuberay-1.3.json"
KUBE_VERSION = "1.30.0"
VALUE_SETS = {"default": {}} | {p.stem: yaml.safe_load(p.read_text()) for p in sorted((CHART / "ci").glob("*.yaml"))}
CRDS = {"RayCluster", "ServiceMonitor", "PrometheusRule"}  # not in the Kubernetes schemas


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(str(CHART))
    try:
        out = chart.render(values, name="demo", namespace="llm", is_install=True)
    finally:
        chart.close()
    docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
    assert docs
    return docs


def test_the_chart_lints_cleanly():
    result = helm.lint(str(CHART), strict=True)
    assert not result["errors"], result["errors"]


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_manifests_validate(name):
    docs = render(VALUE_SETS[name])
    kinds = [d["kind"] for d in docs]
    ray_schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    for doc in docs:
        if doc["kind"] == "RayCluster":
            jsonschema.validate(doc, ray_schema)
            spec = doc["spec"]
            for template in [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]:
                pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template.get("metadata", {})},
                       "spec": template["spec"]}
                kubernetes_validate.validate(pod, KUBE_VERSION, strict=True)
        elif doc["kind"] not in CRDS:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    external = VALUE_SETS[name].get("ray", {}).get("external", {}).get("enabled", False)
    assert ("Deployment" in kinds) == external and ("RayCluster" in kinds) != external
    assert "Service" in kinds


def test_gpu_pools_ask_for_one_gpu_per_worker_and_land_on_their_pool():
    cluster = next(d for d in render(VALUE_SETS["gpu-values"]) if d["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert (groups["prefill"]["replicas"], groups["decode"]["replicas"]) == (2, 4)
    assert cluster["spec"]["enableInTreeAutoscaling"] is True
    for pool, group in groups.items():
        container = group["template"]["spec"]["containers"][0]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert json.loads(group["rayStartParams"]["resources"]) == {f"pdserve_{pool}": 1}
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    command = head["args"][0]
    assert "--prefill-workers 2 --decode-workers 4" in command and "--model /models/Llama-3.1-8B-Instruct" in command


def test_alert_rules_and_dashboard_ship_as_in_deploy_and_slos_reach_the_server():
    docs = {d["kind"]: d for d in render(VALUE_SETS["ingress-values"])}
    rules = yaml.safe_load((CHART.parent.parent / "prometheus" / "pdserve-alerts.yaml").read_text())
    assert docs["PrometheusRule"]["spec"] == rules
    assert docs["PrometheusRule"]["metadata"]["labels"]["release"] == "prometheus"
    dashboard = docs["ConfigMap"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(dashboard["data"]["pdserve.json"]) == json.loads(
        (CHART.parent.parent / "grafana" / "pdserve.json").read_text())
    head = docs["RayCluster"]["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "--slo-ttft-ms 250 --slo-tpot-ms 100 --slo-attainment-target 0.9" in head["args"][0]
    assert not {"PrometheusRule", "ConfigMap"} & {d["kind"] for d in render({})}  # off by default


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_serve_command_parses_with_pdserve_own_flags(name):
    import shlex

    from engine.config import EngineConfig
    from scheduler.cli import build_parser
    from scheduler.config import ServeConfig, from_args
    docs = render(VALUE_SETS[name])
    pods = [d["spec"]["headGroupSpec"]["template"] if d["kind"] == "RayCluster" else d["spec"]["template"]
            for d in docs if d["kind"] in ("RayCluster", "Deployment")]
    (script,) = pods[0]["spec"]["containers"][0]["args"]
    argv = shlex.split(script.split("exec pdserve ", 1)[1].replace("$PDSERVE_API_KEY", "k"))
    args = build_parser().parse_args(argv)  # exits on an unknown flag or a bad value
    config = from_args(ServeConfig, args)
    engine = from_args(EngineConfig, args)
    assert config.mode == "disagg" and config.host == "0.0.0.0" and config.ray_address
    values = VALUE_SETS[name]
    assert engine.engine == values.get("engine", {}).get("backend", "pdserve")
    if engine.engine == "vllm":  # its engine options reach the workers as one validated JSON object
        assert json.loads(engine.vllm_engine_args) == values["engine"]["vllmEngineArgs"]
    assert config.prefill_workers == values.get("prefill", {}).get("replicas", 1)
    scheduling = values.get("scheduling", {})
    assert config.policy == scheduling.get("policy", "jsq")
    assert config.policy_config.local_prefill_tokens == scheduling.get("localPrefillTokens", 2048)
    assert config.role_controller == scheduling.get("roleController", False)
    assert config.controller.window_s == scheduling.get("controllerWindowS", 20)
    assert engine.prefill_schedule == values.get("engine", {}).get("prefillSchedule", "chunked")


def test_the_api_key_comes_from_its_secret():
    docs = render(VALUE_SETS["ingress-values"])
    cluster = next(d for d in docs if d["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-api-key", "key": "api-key"}
    assert '--api-key "$PDSERVE_API_KEY"' in head["args"][0]
    ingress = next(d for d in docs if d["kind"] == "Ingress")
    assert ingress["spec"]["rules"][0]["host"] == "llm.example.com"


@pytest.mark.parametrize("values, message", [
    ({"prefill": {"replicas": -1}}, "/prefill/replicas"),
    ({"decode": {"replicas": 0}}, "/decode/replicas"),
    ({"model": {"source": None}}, "missing property 'source'"),
    ({"model": {"source": "pvc"}}, "/model/pvc/claimName"),
    ({"model": {"source": "s3"}}, "/model/source"),
    ({"scheduling": {"policy": "fastest"}}, "value must be one of 'jsq', 'round-robin', 'prefix'"),
    ({"ray": {"external": {"enabled": True}}}, "/ray/external/address"),
    ({"slo": {"attainmentTarget": 1.5}}, "/slo/attainmentTarget"),
    ({"engine": {"prefillSchedule": "fast"}}, "value must be one of 'whole', 'chunked', 'layered'"),
    ({"engine": {"tokenBudget": 0}}, "/engine/tokenBudget"),
    ({"prefill": {"minReplicas": 3, "replicas": 2}}, "prefill: minReplicas (3) <= replicas (2) <= maxReplicas (1)"),
])
def test_bad_values_are_refused_with_a_message(values, message):
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert message in str(e.value)
