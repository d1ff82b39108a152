"""Helpers the tests share: leak checks, running an engine to the end, HF references,
loopback ports and servers, polling with a deadline, and stalling an engine loop on purpose."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "pdserve.json"
RULES = DEPLOY / "prometheus" / "pdserve-alerts.yaml"


def wait_for(predicate: Callable[[], bool], what: str, timeout_s: float = 10.0, every_s: float = 0.02) -> None:
    """Polls predicate until it holds; fails naming what was awaited after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every_s)


@contextmanager
def stalled(loop) -> Iterator[None]:
    """Holds an engine loop between steps (a call that blocks it) until the block exits: what
    is sent meanwhile queues, and nothing finishes, however fast the engine is."""
    release, entered = threading.Event(), threading.Event()

    def hold(_engine) -> None:
        entered.set()
        release.wait(60)
    future = loop.call(hold)
    assert entered.wait(30), "the engine loop did not stop for the stall"
    try:
        yield
    finally:
        release.set()
        future.result(30)


def assert_no_leak(engine) -> None:
    assert not engine.has_unfinished(), engine.requests
    assert engine.kv.num_used_blocks == 0, f"{engine.kv.num_used_blocks} KV blocks still held"
    assert all(c == 0 for c in engine.kv.pool.ref_cnt)
    assert not engine.runner.sampler._generators


def run_to_end(engine, prompts, params, ids=None) -> dict[str, list[int]]:
    """Adds the prompts, steps until done; returns token ids per request id (index 0)."""
    ids = ids or [str(i) for i in range(len(prompts))]
    for rid, prompt in zip(ids, prompts):
        engine.add_request(rid, prompt, params)
    out: dict[str, list[int]] = {rid: [] for rid in ids}
    steps = 0
    while engine.has_unfinished():
        for o in engine.step():
            if o.index == 0:
                out[o.request_id].extend(o.new_token_ids)
        steps += 1
        assert steps < 100_000
    return out


def hf_greedy(model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    outs = []
    for prompt in prompts:
        gen = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
                             do_sample=False, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        outs.append(gen[0, len(prompt):].tolist())
    return outs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """pdserve's app under uvicorn on 127.0.0.1 in a thread; stopped by `stop()`. Colocated by
    default; with a ServeConfig of mode disagg, a cluster on the running Ray instance."""

    def __init__(self, engine_config, api_key: str | None = None, serve_config=None):
        import uvicorn

        from scheduler.cli import build_disagg_server, build_server
        from scheduler.config import ServeConfig
        serve_config = serve_config or ServeConfig(mode="colocated", api_key=api_key)
        self.loop = self.cluster = None
        if serve_config.mode == "disagg":
            self.app, self.cluster = build_disagg_server(serve_config, engine_config)
        else:
            self.app, self.loop = build_server(engine_config, serve_config)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.05)

    @property
    def engine(self):
        return self.loop.engine

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        if self.loop is not None:
            self.loop.shutdown()
        if self.cluster is not None:
            self.cluster.stop()
        assert not self.thread.is_alive()


def metric_sum(url: str, name: str) -> float:
    """The sum of a metric's series on a live server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    samples = [s.value for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in family.samples if s.name == name]
    if not samples:
        raise KeyError(name)
    return sum(samples)


def dashboard_queries() -> list[str]:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [t["expr"] for p in panels for t in p.get("targets", [])]


def rules() -> list[dict]:
    return [r for group in yaml.safe_load(RULES.read_text())["groups"] for r in group["rules"]]


def metric_names_used() -> set[str]:
    """Every pdserve sample name the dashboard's queries and the alert rules read."""
    exprs = dashboard_queries() + [r["expr"] for r in rules()]
    return {name for expr in exprs for name in re.findall(r"\bpdserve_[a-z0-9_]+", expr)}


class Collector:
    """A request's sink: its tokens, or its error, and an event when it ended."""

    def __init__(self):
        self.tokens, self.error, self.done = [], None, threading.Event()

    def __call__(self, out):
        if isinstance(out, Exception):
            self.error = out
            self.done.set()
            return
        self.tokens.extend(out.new_token_ids)
        if out.finished:
            self.done.set()
