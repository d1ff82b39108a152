"""Helpers the tests share: leak checks, running an engine to the end, HF references,
loopback ports and servers, polling with a deadline, and stalling an engine loop on purpose."""

from __future__ import annotations

import asyncio
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

from engine.outputs import EngineInfo, EngineStats, StepOutput
from engine.request import validate_request
from scheduler.engine_client import EngineClient, ModelInfo

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


@contextmanager
def gated(loop) -> Iterator[Callable[[int], None]]:
    """Lets an engine loop run only as many iterations as the test releases: yields
    release(n); each iteration then waits for a permit before the next. On exit the gate
    opens for good. However fast the engine, a request advances only as far as allowed."""
    permits = threading.Semaphore(0)
    opened = threading.Event()

    def wait_for_permit(_engine) -> None:
        while not opened.is_set() and not permits.acquire(timeout=0.05):
            pass
    loop.add_hook(wait_for_permit)
    try:
        yield lambda n=1: [permits.release() for _ in range(n)]
    finally:
        opened.set()
        loop.remove_hook(wait_for_permit)


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
        from scheduler.api.http_server import make_server
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
        self.server = make_server(self.app, "127.0.0.1", self.port, serve_config.limits)
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


@contextmanager
def serving(app, limits=None):
    """The app under pdserve's HTTP server on 127.0.0.1 in a thread; yields its URL, stops it after."""
    from scheduler.api.http_server import make_server
    from scheduler.api.limits import FrontDoorLimits
    port = free_port()
    server = make_server(app, "127.0.0.1", port, limits or FrontDoorLimits())
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "stub did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive()


class FakeEngineClient(EngineClient):
    """The front door's engine with no model behind it: every sample of a request streams
    max_tokens tokens (the prompt's ids, cycled; or `script`, then stop) while `release` is
    set; clear it and nothing finishes until it is set again. It records what it was asked to check and abort, and
    which requests are streaming."""

    def __init__(self, max_model_len: int = 256, vocab_size: int = 512):
        self.info = ModelInfo("fake", max_model_len, vocab_size)
        self.release = threading.Event()
        self.release.set()
        self.checked: list[list[int]] = []
        self.aborted: list[tuple[str, int | None]] = []
        self.active: set[str] = set()
        self.refuse: Exception | None = None  # raised when a request starts (e.g. Overloaded)
        self.stall_at: int | None = None  # every sample waits at this token for `unstall`
        self.unstall = threading.Event()
        self.down: str | None = None  # why it cannot serve (/health answers 503), None: it can
        self.script: list[int] | None = None  # what every sample generates, when set

    def check(self, prompt_token_ids, params) -> None:
        self.checked.append(list(prompt_token_ids))
        validate_request(prompt_token_ids, params, self.info.max_model_len, self.info.vocab_size)

    async def generate(self, request_id, prompt_token_ids, params, arrival_s=None):
        if self.refuse is not None:
            raise self.refuse
        self.active.add(request_id)
        try:
            script = self.script
            num = len(script) if script else params.max_tokens or 1
            for i in range(num):
                for index in range(params.n):
                    while not self.release.is_set() or (i == self.stall_at and not self.unstall.is_set()):
                        await asyncio.sleep(0.005)  # held on purpose
                    last = i == num - 1
                    token = script[i] if script else prompt_token_ids[i % len(prompt_token_ids)]
                    yield StepOutput(request_id, index, [token], finish_reason=("stop" if script else "length") if last else None,
                                     num_prompt_tokens=len(prompt_token_ids))
        finally:
            self.active.discard(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.aborted.append((request_id, index))

    async def workers(self):
        return []

    async def unready(self):
        return self.down


class FakeEngine:
    """A second implementation of engine.interface.WorkerEngine, with no model: each sample
    emits the token ids 1, 2, 3, ... one per step until max_tokens; a decode-side request is
    admitted once its last KV chunk and its first token are in. What the worker layer may
    rely on is what this fake does too."""

    def __init__(self, max_model_len: int = 256, vocab_size: int = 512, block_size: int = 16):
        self.info = EngineInfo(max_model_len, vocab_size, block_size, 1024, (block_size, 1, 8), "float32", "cpu")
        self.running: dict[tuple[str, int], list] = {}  # (id, index) -> [tokens emitted, max_tokens]
        self.waiting: dict[str, dict] = {}  # decode side: reserved, KV or first token still awaited
        self.ready: list[StepOutput] = []
        self.sink = None

    def validate(self, prompt_token_ids, params, prefills=True) -> None:
        validate_request(prompt_token_ids, params, self.info.max_model_len, self.info.vocab_size)

    def add_request(self, request_id, prompt_token_ids, params, arrival_s=None, validated=False) -> None:
        if not validated:
            self.validate(prompt_token_ids, params)
        for index in range(params.n):
            self.running[(request_id, index)] = [0, params.max_tokens or 1]

    def abort(self, request_id, index=None) -> bool:
        keys = [k for k in self.running if k[0] == request_id and index in (None, k[1])]
        for key in keys:
            del self.running[key]
        return bool(keys) or self.waiting.pop(request_id, None) is not None

    def step(self) -> list[StepOutput]:
        if self.ready:
            out, self.ready = self.ready, []
            return out
        outputs = []
        for (request_id, index), state in list(self.running.items()):
            state[0] += 1
            done = state[0] >= state[1]
            outputs.append(StepOutput(request_id, index, [state[0]], finish_reason="length" if done else None))
            if done:
                del self.running[(request_id, index)]
        return outputs

    def has_work(self) -> bool:
        return bool(self.running or self.ready)

    def has_request(self, request_id) -> bool:
        return request_id in self.waiting or any(k[0] == request_id for k in self.running)

    def num_requests(self) -> int:
        return len(self.waiting) + len({k[0] for k in self.running})

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), len(self.waiting), 0, self.info.num_kv_blocks, 0, 0)

    def close(self) -> None:
        pass

    def set_kv_sink(self, sink) -> None:
        self.sink = sink

    def open_kv_link(self, link) -> None:
        pass  # one rank

    def close_kv_link(self, link_no) -> None:
        pass

    def reserve_prefilled(self, request_id, prompt_token_ids, params, arrival_s=None, transfer_id=0) -> int | None:
        self.waiting[request_id] = {"landed": False, "first": None, "max_tokens": params.max_tokens or 1}
        return 0

    def allocated(self) -> list[tuple[str, int]]:
        return []

    def waiting_for_kv(self, request_id) -> bool:
        return request_id in self.waiting

    def receive_kv(self, chunk) -> bool:
        state = self.waiting.get(chunk.request_id)
        if state is None:
            return False
        state["landed"] = state["landed"] or chunk.last
        self._admit_when_ready(chunk.request_id)
        return True

    def give_first_token(self, request_id, token_id, logprob=None, prefill_s=0.0) -> bool:
        state = self.waiting.get(request_id)
        if state is None:
            return False
        state["first"] = token_id
        self._admit_when_ready(request_id)
        return True

    def _admit_when_ready(self, request_id) -> None:
        state = self.waiting[request_id]
        if state["landed"] and state["first"] is not None:
            self.ready.append(self.admit_prefilled(request_id, state["first"]))

    def admit_prefilled(self, request_id, first_token_id, first_logprob=None) -> StepOutput | None:
        state = self.waiting.pop(request_id, None)
        if state is None:
            return None
        if state["max_tokens"] > 1:
            self.running[(request_id, 0)] = [1, state["max_tokens"]]
        return StepOutput(request_id, 0, [first_token_id], finish_reason=None if state["max_tokens"] > 1 else "length")


def unchecked(params, **fields):
    """params with fields set past SamplingParams' validation: what a value the front door
    failed to refuse would look like to the engine."""
    for name, value in fields.items():
        object.__setattr__(params, name, value)
    return params


def divergences_beyond_ties(reference, low_precision, prompts: list[list[int]], got: list[list[int]],
                            expected: list[list[int]]) -> list[str]:
    """Greedy outputs of two different low-precision computations may part where two tokens
    tie to within their rounding. For each prompt whose `got` parts from `expected` (the
    `low_precision` model's own greedy output), the `reference` model (the same weights in
    float32) scores both tokens at the first differing position: a gap wider than twice the
    low-precision model's own largest logit error there (against the reference: two roundings,
    each about that large) is a real difference. Returns those, described."""
    bad = []
    for i, (prompt, ours, theirs) in enumerate(zip(prompts, got, expected)):
        j = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if j is None:
            continue
        context = torch.tensor([prompt + ours[:j]])
        with torch.no_grad():
            exact = reference(context).logits[0, -1].float()
            rounded = low_precision(context).logits[0, -1].float()
        gap, error = abs(float(exact[ours[j]] - exact[theirs[j]])), float((rounded - exact).abs().max())
        if gap > 2 * error:
            bad.append(f"prompt {i} token {j}: {ours[j]} vs {theirs[j]}, logit gap {gap:.4f} beyond twice the "
                       f"low-precision model's own error {error:.4f}")
    return bad
