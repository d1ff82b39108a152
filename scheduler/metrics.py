"""Prometheus metrics of one front door, in a registry of its own (several servers may share
a process in tests). Engine gauges are read from the engine's stats at scrape time."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from engine.engine import EngineStats

_LATENCY_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
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
        self.errors = Counter("pdserve_requests_rejected", "Requests refused with a 4xx or failed with a 5xx", ["status"], registry=r)
        self.running = Gauge("pdserve_engine_running_requests", "Requests in the running batch", registry=r)
        self.waiting = Gauge("pdserve_engine_waiting_requests", "Requests waiting for admission", registry=r)
        self.kv_used = Gauge("pdserve_kv_blocks_used", "KV-cache blocks in use", registry=r)
        self.kv_total = Gauge("pdserve_kv_blocks_total", "KV-cache blocks in all", registry=r)

    def observe_phases(self, timings: dict[str, float]) -> None:
        for name, value in timings.items():
            if name == "kv_span":
                self.kv_span.observe(value)
            elif name == "kv_bytes":
                self.kv_bytes.inc(value)
            else:
                self.phase.labels(name).observe(value)

    def render(self, stats: EngineStats) -> bytes:
        self.running.set(stats.num_running)
        self.waiting.set(stats.num_waiting)
        self.kv_used.set(stats.num_kv_blocks_used)
        self.kv_total.set(stats.num_kv_blocks_total)
        return generate_latest(self.registry)
