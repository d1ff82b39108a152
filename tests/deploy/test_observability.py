"""The Grafana dashboard and the Prometheus alert rules, and the metrics they read: the
dashboard JSON is what deploy/grafana/dashboard.py builds, every query and rule expression
parses as PromQL, the rules are well formed, and the SLO and worker metrics count what they
say. That a live disaggregated server serves every metric named here is checked in
tests/scheduler/test_cluster.py (it needs the Ray deployment)."""

import importlib.util
import json
import re

import pytest

from helpers import DASHBOARD, DEPLOY, dashboard_queries, rules

GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "1h"}  # what Grafana substitutes before querying


def test_the_dashboard_is_what_its_builder_makes():
    pytest.importorskip("grafana_foundation_sdk")
    spec = importlib.util.spec_from_file_location("dashboard", DEPLOY / "grafana" / "dashboard.py")
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    assert builder.render() == DASHBOARD.read_text(), \
        "deploy/grafana/pdserve.json is stale: python deploy/grafana/dashboard.py > deploy/grafana/pdserve.json"


def test_the_dashboard_covers_slos_phases_pools_transfer_and_health():
    board = json.loads(DASHBOARD.read_text())
    titles = {p["title"] for p in board["panels"]}
    assert {"TTFT", "TPOT", "SLO attainment", "Goodput", "Latency per phase (p90)", "Queue depth per pool",
            "KV usage per pool", "KV transfer rate", "Workers up"} <= titles
    for panel in board["panels"]:
        ref_ids = [t["refId"] for t in panel.get("targets", [])]
        assert len(set(ref_ids)) == len(ref_ids) and all(ref_ids), panel["title"]
        if panel["title"] in ("TTFT", "TPOT", "SLO attainment"):  # drawn against their SLO lines
            assert any("pdserve_slo_" in t["expr"] for t in panel["targets"]), panel["title"]
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "job"}


def test_every_query_and_rule_parses_as_promql():
    promql = pytest.importorskip("promql_parser")
    exprs = dashboard_queries() + [r["expr"] for r in rules()]
    assert len(exprs) > 30
    for expr in exprs:
        for variable, value in GRAFANA_VARIABLES.items():
            expr = expr.replace(variable, value)
        promql.parse(expr)  # raises on a syntax error


def test_alert_rules_are_well_formed():
    found = {r["alert"]: r for r in rules()}
    assert {"PdserveSLOAttainmentLow", "PdserveWorkerDown", "PdserveKVCacheNearlyFull"} <= set(found)
    for name, rule in found.items():
        assert re.fullmatch(r"\d+[smh]", rule["for"]), name
        assert rule["labels"]["severity"] in ("warning", "critical"), name
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], name
    # user-set thresholds come from the server, not from this file
    assert "pdserve_slo_attainment_target" in found["PdserveSLOAttainmentLow"]["expr"]


def _sample(metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_slo_attainment_is_judged_jointly_per_sample_and_5xx_count_as_missed():
    from scheduler.config import ServeConfig
    from scheduler.metrics import ServerMetrics
    m = ServerMetrics(ServeConfig(slo_ttft_ms=100, slo_tpot_ms=20, slo_attainment_target=0.95))
    assert _sample(m, "pdserve_slo_ttft_seconds") == 0.1 and _sample(m, "pdserve_slo_tpot_seconds") == 0.02
    assert _sample(m, "pdserve_slo_attainment_target") == 0.95
    m.judge(0.1, 0.02)      # both exactly at their SLOs: met
    m.judge(0.05, None)     # one token: no TPOT to judge
    m.judge(0.2, 0.01)      # TTFT missed
    m.judge(0.05, 0.03)     # TPOT missed
    m.reject(400)           # bad input: not a served request
    m.reject(503)           # the server could not serve it: missed
    assert _sample(m, "pdserve_slo_requests_total", result="met") == 2
    assert _sample(m, "pdserve_slo_requests_total", result="missed") == 3
    assert _sample(m, "pdserve_requests_rejected_total", status="400") == 1


def test_worker_gauges_follow_the_view_and_drop_gone_workers():
    from prometheus_client.parser import text_string_to_metric_families

    from scheduler.metrics import ServerMetrics
    from scheduler.policies import WorkerLoad
    from scheduler.router import WorkerView
    m = ServerMetrics()
    prefill = WorkerView("prefill-0", "prefill", "a:1", WorkerLoad("prefill-0", 300, 1, 2, 90, weight_bytes_dense=7,
                                                                   weight_bytes_expert=11), 100)
    decode = WorkerView("decode-0", "decode", "a:2", WorkerLoad("decode-0", 0, 5, 1, 40, alive=False), 100)

    def samples(views):
        text = m.render(views).decode()
        return {(s.name, s.labels.get("pool"), s.labels.get("worker"), s.labels.get("kind")): s.value
                for f in text_string_to_metric_families(text) for s in f.samples if s.name.startswith("pdserve_worker")}

    got = samples([prefill, decode])
    assert got[("pdserve_worker_up", "prefill", "prefill-0", None)] == 1
    assert got[("pdserve_worker_up", "decode", "decode-0", None)] == 0
    assert got[("pdserve_worker_pending_prefill_tokens", "prefill", "prefill-0", None)] == 300
    assert got[("pdserve_worker_kv_blocks_used", "decode", "decode-0", None)] == 60
    assert got[("pdserve_worker_kv_blocks_total", "decode", "decode-0", None)] == 100
    assert got[("pdserve_worker_running_requests", "decode", "decode-0", None)] == 5
    assert got[("pdserve_worker_waiting_requests", "prefill", "prefill-0", None)] == 2
    assert got[("pdserve_worker_weight_bytes_read_total", "prefill", "prefill-0", "dense")] == 7
    assert got[("pdserve_worker_weight_bytes_read_total", "prefill", "prefill-0", "expert")] == 11
    assert not any(worker == "decode-0" for _, _, worker, _ in samples([prefill]))


def test_the_load_rpc_carries_weight_bytes_to_the_scheduler(tiny_llama, make_engine):
    """A worker's Load reply holds the weight bytes its steps read; the global scheduler's
    poll turns them into the WorkerLoad the metrics render."""
    from engine.worker.loop import EngineLoop
    from engine.worker.servicer import WorkerServicer, start_server
    from scheduler.worker_rpc import LoadClient

    from helpers import run_to_end
    from parity_cases import GREEDY, prompts
    engine = make_engine(model=str(tiny_llama))
    run_to_end(engine, prompts()[:2], GREEDY)
    worker = EngineLoop(engine)  # not started: Load reads the stats it took when built
    server, port = start_server(WorkerServicer("w0", "i0", worker, "decode"), "127.0.0.1")
    client = LoadClient()
    try:
        load, incarnation = client.poll([f"127.0.0.1:{port}"], 5.0)[f"127.0.0.1:{port}"]
    finally:
        client.forget(f"127.0.0.1:{port}")
        server.stop(0)
    assert incarnation == "i0" and load.weight_bytes_dense == engine.stats().weight_bytes_dense > 0
    assert load.weight_bytes_expert == 0  # a dense model
