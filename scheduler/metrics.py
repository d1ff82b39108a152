"""Prometheus metrics of one front door, in a registry of its own (several servers may share
a process in tests). Worker gauges are read from the client's view of its workers at scrape
time, one series per worker labelled with its pool (prefill, decode or colocated).

SLO attainment is judged per finished sample, jointly: TTFT <= --slo-ttft-ms and TPOT <=
--slo-tpot-ms (TPOT only when it produced 2+ tokens). A request failed by the server (5xx)
counts as missed. deploy/grafana and deploy/prometheus read these names; a test checks that
each one they use is served.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from scheduler.config import ServeConfig
from scheduler.router import WorkerView
from scheduler.vllm_metrics import VllmMetrics

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self, config: ServeConfig = ServeConfig(), model_name: str = "") -> None:
        self.slo_ttft_s, self.slo_tpot_s = config.slo_ttft_ms / 1000, config.slo_tpot_ms / 1000
        self.registry = r = CollectorRegistry()
        self.vllm = VllmMetrics(r, model_name)  # vLLM's names for the same observations
        self.ttft = Histogram("pdserve_request_ttft_seconds", "Time to first token (server side)", buckets=_LATENCY_S, registry=r)
        self.itl = Histogram("pdserve_request_itl_seconds", "Gap between consecutive output tokens", buckets=_LATENCY_S, registry=r)
        self.tpot = Histogram("pdserve_request_tpot_seconds", "Per-request time per output token after the first", buckets=_LATENCY_S, registry=r)
        self.e2e = Histogram("pdserve_request_e2e_seconds", "Arrival to last token", buckets=_LATENCY_S, registry=r)
        self.queue = Histogram("pdserve_request_queue_seconds", "Arrival to first scheduled step", buckets=_LATENCY_S, registry=r)
        self.phase = Histogram("pdserve_request_phase_seconds", "Seconds per request in each phase: queue, prefill, "
                               "transfer (KV landing after the first token), decode_queue, decode", ["phase"],
                               buckets=_LATENCY_S, registry=r)
        self.kv_span = Histogram("pdserve_kv_transfer_seconds", "First to last KV chunk of a prompt landing on its "
                                 "decode worker (overlaps prefill)", buckets=_LATENCY_S, registry=r)
        self.kv_bytes = Counter("pdserve_kv_transfer_bytes", "Prompt KV bytes shipped from prefill to decode workers",
                                registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens received", registry=r)
        self.generation_tokens = Counter("pdserve_generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("pdserve_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r)
        self.finished = Counter("pdserve_requests_finished", "Finished requests (samples) by reason", ["reason"], registry=r)
        self.unknown_fields = Counter("pdserve_request_unknown_fields", "Request fields pdserve does not know, "
                                      "by name (ignored; --strict-fields refuses them)", ["field"], registry=r)
        self.errors = Counter("pdserve_requests_rejected", "Requests refused with a 4xx or failed with a 5xx", ["status"], registry=r)
        self.slo = Counter("pdserve_slo_requests", "Finished samples by whether they met both the TTFT and "
                           "the TPOT SLO (result: met, missed; a 5xx counts as missed)", ["result"], registry=r)
        for result in ("met", "missed"):
            self.slo.labels(result)
        Gauge("pdserve_slo_ttft_seconds", "TTFT SLO (--slo-ttft-ms)", registry=r).set(self.slo_ttft_s)
        Gauge("pdserve_slo_tpot_seconds", "TPOT SLO (--slo-tpot-ms)", registry=r).set(self.slo_tpot_s)
        Gauge("pdserve_slo_attainment_target", "Fraction of requests that should meet the SLOs "
              "(--slo-attainment-target)", registry=r).set(config.slo_attainment_target)
        worker = ["pool", "worker"]
        self.worker_gauges = {
            "up": Gauge("pdserve_worker_up", "1 while the worker answers the scheduler's polls", worker, registry=r),
            "running": Gauge("pdserve_worker_running_requests", "Requests in the worker's running batch",
                             worker, registry=r),
            "waiting": Gauge("pdserve_worker_waiting_requests", "Requests queued on the worker (for admission, "
                             "or for KV blocks on a decode worker)", worker, registry=r),
            "pending": Gauge("pdserve_worker_pending_prefill_tokens", "Prompt tokens queued or being prefilled",
                             worker, registry=r),
            "used": Gauge("pdserve_worker_kv_blocks_used", "KV-cache blocks in use", worker, registry=r),
            "total": Gauge("pdserve_worker_kv_blocks_total", "KV-cache blocks in all", worker, registry=r),
            "lent": Gauge("pdserve_worker_lent", "1 while the mixed-pool policy lends the worker to the pool "
                          "labelled (it runs both phases)", worker, registry=r),
        }
        self.controller_latency = Gauge("pdserve_controller_window_seconds", "The role (or semi-PD split) "
                                        "controller's last windowed p90 of TTFT and TPOT", ["metric"], registry=r)
        self.controller_verdict = Gauge("pdserve_controller_verdict", "1 for the last verdict of the role "
                                        "controller, or of semi-PD's split controller (ok, both-miss, need-prefill, "
                                        "need-decode, few-samples, off)", ["verdict"], registry=r)
        self.split_share = Gauge("pdserve_semi_pd_share_percent", "Semi-PD: each stream's share of the device "
                                 "(CPU: of the torch threads; GPU: of the SMs)", ["phase"], registry=r)
        self.cumulative = _Cumulative()  # counts workers and the scheduler keep, as counters
        r.register(self.cumulative)

    def observe_phases(self, timings: dict[str, float]) -> None:
        for name, value in timings.items():
            if name == "kv_span":
                self.kv_span.observe(value)
            elif name == "kv_bytes":
                self.kv_bytes.inc(value)
            else:
                self.phase.labels(name).observe(value)

    def judge(self, ttft_s: float, tpot_s: float | None) -> None:
        met = ttft_s <= self.slo_ttft_s and (tpot_s is None or tpot_s <= self.slo_tpot_s)
        self.slo.labels("met" if met else "missed").inc()

    def reject(self, status: int) -> None:
        """A request refused (4xx) or failed by the server (5xx, an SLO miss)."""
        self.errors.labels(str(status)).inc()
        if status >= 500:
            self.slo.labels("missed").inc()

    def render(self, workers: list[WorkerView], control: dict | None = None) -> bytes:
        for gauge in (*self.worker_gauges.values(), self.controller_verdict):
            gauge.clear()  # workers come and go; series of gone workers go with them
        control = control or {}
        self.vllm.workers = workers
        lent = control.get("lent", {})
        for w in workers:
            g, load, key = self.worker_gauges, w.load, (w.role, w.worker_id)
            g["up"].labels(*key).set(int(load.alive))
            g["running"].labels(*key).set(load.num_running)
            g["waiting"].labels(*key).set(load.num_waiting)
            g["pending"].labels(*key).set(load.pending_prefill_tokens)
            g["used"].labels(*key).set(w.num_total_blocks - load.num_free_blocks)
            g["total"].labels(*key).set(w.num_total_blocks)
            if w.worker_id in lent:
                g["lent"].labels(lent[w.worker_id], w.worker_id).set(1)
        for metric in ("ttft", "tpot"):
            if control.get(f"{metric}_s") is not None:
                self.controller_latency.labels(metric).set(control[f"{metric}_s"])
        if "verdict" in control:
            self.controller_verdict.labels(control["verdict"]).set(1)
        if "prefill_share" in control:
            self.split_share.labels("prefill").set(control["prefill_share"])
            self.split_share.labels("decode").set(100 - control["prefill_share"])
        self.cumulative.workers, self.cumulative.control = workers, control
        return generate_latest(self.registry)


class _Cumulative(Collector):
    """Counts since a worker (or the scheduler, or this front door) started, read at scrape time
    from `workers` and `control` (what `render` was given). A restarted worker starts again
    from 0: a counter reset, which rate() and increase() allow for."""

    def __init__(self) -> None:
        self.workers: list[WorkerView] = []
        self.control: dict = {}

    def collect(self):
        worker = ["pool", "worker"]
        weight = CounterMetricFamily("pdserve_worker_weight_bytes_read", "Weight bytes the worker's steps read "
                                     "(kind: dense, or expert: each expert once per layer run that routed a token "
                                     "to it)", labels=[*worker, "kind"])
        predicted = CounterMetricFamily("pdserve_worker_predicted_prefills", "Prompts the worker prefilled from a "
                                        "KV predictor's KV", labels=worker)
        moves = CounterMetricFamily("pdserve_controller_role_moves", "Workers the role controller moved into each "
                                    "pool", labels=["pool"])
        local = CounterMetricFamily("pdserve_local_prefills", "Requests this front door routed to be prefilled on "
                                    "their decode worker", value=self.control.get("local_prefills", 0))
        for w in self.workers:
            key, load = [w.role, w.worker_id], w.load
            weight.add_metric([*key, "dense"], load.weight_bytes_dense)
            weight.add_metric([*key, "expert"], load.weight_bytes_expert)
            predicted.add_metric(key, load.num_predicted_prefills)
        for pool, n in self.control.get("moves", {}).items():
            moves.add_metric([pool], n)
        yield from (weight, predicted, moves, local)
