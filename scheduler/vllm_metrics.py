"""vLLM's metric names, served beside pdserve's own on /metrics, so dashboards, alerts and
autoscalers written for vLLM work unchanged. Always on: they cost one observation per
token event, and a drop-in server that needs a flag before a vLLM dashboard shows anything is
not a drop-in.

Every series carries `model_name` (the served name). Per-request histograms and counters are
the front door's own observations (the same ones pdserve_* histograms take); the engine-state
series (running, waiting, KV usage, prefix-cache queries and hits) are read from the workers'
load at scrape time, per worker (`engine` label), cumulative ones as counters.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from scheduler.router import WorkerView

_LATENCY_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
              40.0, 80.0, 160.0, 640.0, 2560.0)
_TOKENS = tuple(float(2 ** i) for i in range(15))
_PHASES = {"queue": "request_queue_time_seconds", "prefill": "request_prefill_time_seconds",
           "decode": "request_decode_time_seconds"}


class VllmMetrics:
    def __init__(self, registry: CollectorRegistry, model_name: str = "") -> None:
        self.model_name = model_name
        label = ["model_name"]

        def hist(name: str, doc: str, buckets=_LATENCY_S) -> Histogram:
            return Histogram(f"vllm:{name}", doc, label, buckets=buckets, registry=registry)

        self.ttft = hist("time_to_first_token_seconds", "Histogram of time to first token in seconds.")
        self.itl = hist("inter_token_latency_seconds", "Histogram of inter-token latency in seconds.")
        self.itl_old = hist("time_per_output_token_seconds", "Inter-token latency (the name older dashboards use).")
        self.tpot = hist("request_time_per_output_token_seconds", "Histogram of time_per_output_token_seconds per request.")
        self.e2e = hist("e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.")
        self.phases = {phase: hist(name, f"Histogram of time spent in the {phase.upper()} phase of a request.")
                       for phase, name in _PHASES.items()}
        self.prompt_len = hist("request_prompt_tokens", "Number of prefill tokens processed.", _TOKENS)
        self.output_len = hist("request_generation_tokens", "Number of generation tokens processed.", _TOKENS)
        self.max_output_len = hist("request_max_num_generation_tokens", "Histogram of maximum number of requested "
                                   "generation tokens.", _TOKENS)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", label,
                                     registry=registry)
        self.generation_tokens = Counter("vllm:generation_tokens", "Number of generation tokens processed.", label,
                                         registry=registry)
        self.success = Counter("vllm:request_success", "Count of successfully processed requests.",
                               [*label, "finished_reason"], registry=registry)
        registry.register(_EngineState(self))
        self.workers: list[WorkerView] = []

    def first_token(self, ttft_s: float) -> None:
        self.ttft.labels(self.model_name).observe(ttft_s)

    def token_gap(self, seconds: float) -> None:
        self.itl.labels(self.model_name).observe(seconds)
        self.itl_old.labels(self.model_name).observe(seconds)

    def tokens(self, prompt: int = 0, generated: int = 0) -> None:
        if prompt:
            self.prompt_tokens.labels(self.model_name).inc(prompt)
        if generated:
            self.generation_tokens.labels(self.model_name).inc(generated)

    def request_done(self, max_output_tokens: int) -> None:
        """A request's last sample finished; max_output_tokens: the most any of its samples made."""
        self.max_output_len.labels(self.model_name).observe(max_output_tokens)

    def finished(self, reason: str, e2e_s: float, tpot_s: float | None, num_prompt: int, num_output: int,
                 phases: dict[str, float] | None) -> None:
        m = self.model_name
        self.e2e.labels(m).observe(e2e_s)
        if tpot_s is not None:
            self.tpot.labels(m).observe(tpot_s)
        self.prompt_len.labels(m).observe(num_prompt)
        self.output_len.labels(m).observe(num_output)
        if reason in ("stop", "length", "abort", "tool_calls"):
            self.success.labels(m, reason).inc()
        for phase, seconds in (phases or {}).items():
            if phase in self.phases:
                self.phases[phase].labels(m).observe(seconds)


class _EngineState(Collector):
    """Series read from the workers' last load at scrape time (`VllmMetrics.workers`)."""

    def __init__(self, owner: VllmMetrics):
        self.owner = owner

    def collect(self):
        labels = ["model_name", "engine"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Number of requests in model execution batches.",
                                    labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                                    labels=labels)
        usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                                  labels=labels)
        usage_old = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV-cache usage (the name older dashboards use).",
                                      labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number of "
                                      "queried tokens.", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of cached "
                                   "tokens.", labels=labels)
        for w in self.owner.workers:
            key, load = [self.owner.model_name, w.worker_id], w.load
            running.add_metric(key, load.num_running)
            waiting.add_metric(key, load.num_waiting)
            total = w.num_total_blocks
            for family in (usage, usage_old):
                family.add_metric(key, (total - load.num_free_blocks) / total if total else 0.0)
            queries.add_metric(key, load.prefix_queries_tokens)
            hits.add_metric(key, load.prefix_hit_tokens)
        yield from (running, waiting, usage, usage_old, queries, hits)
