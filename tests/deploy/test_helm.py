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


def render_files(values: dict) -> dict[str, str]:
    chart = helm.Chart.load(str(CHART))
    try:
        return chart.render(values, name="demo", namespace="llm", is_install=True)
    finally:
        chart.close()


def render(values: dict) -> list[dict]:
    docs = [d for name, text in render_files(values).items() if not name.endswith("NOTES.txt")
            for d in yaml.safe_load_all(text) if d]
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


def test_tensor_parallel_pools_reach_the_server_and_ray_holds_a_bundle_per_rank():
    values = {"prefill": {"tensorParallelSize": 2}, "decode": {"tensorParallelSize": 4}}
    cluster = next(d for d in render(values) if d["kind"] == "RayCluster")
    groups = {g["groupName"]: g for g in cluster["spec"]["workerGroupSpecs"]}
    assert json.loads(groups["prefill"]["rayStartParams"]["resources"]) == {"pdserve_prefill": 2}
    assert json.loads(groups["decode"]["rayStartParams"]["resources"]) == {"pdserve_decode": 4}
    command = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["args"][0]
    assert "--prefill-tp 2 --decode-tp 4" in command


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
    (script,) = pods(docs)[0]["spec"]["containers"][0]["args"]  # the head's, or the front door's
    argv = shlex.split(script.split("exec pdserve ", 1)[1])
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


def pods(docs: list[dict]) -> list[dict]:
    """Every pod template rendered: the RayCluster's head and worker groups, Deployments."""
    out = []
    for d in docs:
        if d["kind"] == "RayCluster":
            out += [d["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in d["spec"]["workerGroupSpecs"]]
        elif d["kind"] == "Deployment":
            out.append(d["spec"]["template"])
    return out


@pytest.mark.parametrize("name", list(VALUE_SETS))
def test_the_api_key_comes_from_its_secret_and_never_a_command_line(name):
    docs = render(VALUE_SETS[name] | {"apiKey": {"existingSecret": "pdserve-api-key"}})
    for pod in pods(docs):
        for container in pod["spec"]["containers"]:
            env = {e["name"]: e for e in container["env"]}
            assert env["PDSERVE_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "pdserve-api-key", "key": "api-key"}
            assert not any("API_KEY" in arg or "api-key" in arg for arg in container.get("args", []))


def test_the_server_reads_its_api_key_from_the_environment(monkeypatch):
    from scheduler.cli import build_parser, serve_config
    args = build_parser().parse_args(["serve"])
    monkeypatch.setenv("PDSERVE_API_KEY", "from-env")
    assert serve_config(args).api_key == "from-env"
    assert serve_config(build_parser().parse_args(["serve", "--api-key", "flag"])).api_key == "flag"
    monkeypatch.delenv("PDSERVE_API_KEY")
    assert serve_config(args).api_key is None


def test_every_pod_runs_locked_down_with_probes_and_the_operator_settings():
    values = VALUE_SETS["operator-values"]
    docs = render(values)
    account = next(d for d in docs if d["kind"] == "ServiceAccount")
    assert account["metadata"]["name"] == "llm" and account["metadata"]["annotations"] == values["serviceAccount"]["annotations"]
    assert all(d["metadata"]["name"].startswith("llm") for d in docs)  # fullnameOverride
    assert all(d["metadata"]["labels"]["app.kubernetes.io/name"] == "llm-serving" for d in docs)  # nameOverride
    templates = pods(docs)
    assert len(templates) == 3
    for pod in templates:
        spec = pod["spec"]
        assert spec["serviceAccountName"] == "llm" and spec["automountServiceAccountToken"] is False
        assert spec["securityContext"] == values["podSecurityContext"]
        assert spec["priorityClassName"] == "llm-serving" and spec["imagePullSecrets"] == [{"name": "regcred"}]
        assert pod["metadata"]["annotations"] == values["podAnnotations"]
        assert pod["metadata"]["labels"]["team"] == "inference"
        assert {"name": "tmp", "emptyDir": {}} in spec["volumes"]
        (container,) = spec["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["HOME"] == "/tmp" and env["HF_HUB_OFFLINE"] == "1"
        assert container["envFrom"] == values["envFrom"]
        assert container["livenessProbe"] and container["readinessProbe"]
    head = templates[0]["spec"]["containers"][0]
    assert head["startupProbe"]["httpGet"]["path"] == "/version" and head["startupProbe"]["failureThreshold"] == 90
    assert head["livenessProbe"]["httpGet"]["path"] == "/version" and head["readinessProbe"]["httpGet"]["path"] == "/health"
    worker = templates[1]["spec"]["containers"][0]
    assert "local_raylet_healthz" in worker["livenessProbe"]["exec"]["command"][-1]


def test_disruption_budgets_protect_pools_of_more_than_one_pod():
    assert not [d for d in render({}) if d["kind"] == "PodDisruptionBudget"]  # one pod each: none
    budgets = {d["metadata"]["name"]: d["spec"] for d in render(VALUE_SETS["gpu-values"])
               if d["kind"] == "PodDisruptionBudget"}
    assert budgets["demo-pdserve-prefill"]["minAvailable"] == 1 and budgets["demo-pdserve-decode"]["minAvailable"] == 3
    pinned = render(VALUE_SETS["gpu-values"] | {"podDisruptionBudget": {"minAvailable": 2}})
    assert {d["spec"]["minAvailable"] for d in pinned if d["kind"] == "PodDisruptionBudget"} == {2}


def test_notes_say_how_to_reach_the_service():
    notes = render_files({})["pdserve/templates/NOTES.txt"]
    assert "kubectl --namespace llm port-forward service/demo-pdserve 8000:8000" in notes
    assert '"model": "SmolLM2-135M-Instruct"' in notes and "/metrics" in notes
    keyed = render_files(VALUE_SETS["ingress-values"])["pdserve/templates/NOTES.txt"]
    assert "https://llm.example.com/" in keyed and "get secret pdserve-api-key" in keyed


def test_the_chart_readme_lists_every_value_and_is_current():
    import importlib.util
    import sys
    spec = importlib.util.spec_from_file_location("chart_readme", CHART.parent / "readme.py")
    readme = sys.modules["chart_readme"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    rows = readme.rows((CHART / "values.yaml").read_text())
    assert all(r.description for r in rows), [r.key for r in rows if not r.description]
    assert {r.key for r in rows} >= {"nameOverride", "serviceAccount.create", "head.probes.startupFailureThreshold",
                                     "prefill.replicas", "podDisruptionBudget.minAvailable", "securityContext"}
    assert (CHART / "README.md").read_text() == readme.render((CHART / "values.yaml").read_text()), \
        "the chart README is stale: python deploy/helm/readme.py"


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
    ({"replicaz": 2}, "additional properties 'replicaz' not allowed"),
    ({"decode": {"replicaz": 2}}, "at '/decode': additional properties 'replicaz' not allowed"),
    ({"head": {"probes": {"startupPeriod": 5}}}, "at '/head/probes': additional properties 'startupPeriod' not allowed"),
    ({"serviceAccount": {"create": "yes"}}, "/serviceAccount/create"),
    ({"decode": {"tensorParallelSize": 0}}, "/decode/tensorParallelSize"),
    ({"prefill": {"tensorParallelSize": 2, "gpusPerPod": 1}}, "prefill: tensorParallelSize 2 runs on CPU pods"),
])
def test_bad_values_are_refused_with_a_message(values, message):
    with pytest.raises(helm.HelmError) as e:
        render(values)
    assert message in str(e.value)
