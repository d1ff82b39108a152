"""Shared fixtures: tiny random models built offline, engines with a leak check, HF
references, and an HTTP server on loopback stopped after its tests."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
import torch

from tiny_models import build_model


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model per supported architecture, built lazily."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, arch):
            cache[arch] = build_model(root / arch, arch)
            self[arch] = cache[arch]
            return cache[arch]

    return Lazy()


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


def assert_no_leak(engine) -> None:
    assert not engine.has_unfinished(), engine.requests
    assert engine.kv.num_used_blocks == 0, f"{engine.kv.num_used_blocks} KV blocks still held"
    assert all(c == 0 for c in engine.kv.pool.ref_cnt)
    assert not engine.runner.sampler._generators


@pytest.fixture
def make_engine():
    """Builds engines from EngineConfig kwargs; checks every block is free afterwards."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    engines = []

    def make(**kwargs):
        kwargs.setdefault("num_kv_blocks", 128)
        kwargs.setdefault("max_model_len", 512)
        engine = Engine(EngineConfig(**kwargs))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_no_leak(engine)


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


@pytest.fixture(scope="session")
def references(tiny_dirs):
    """HF transformers' greedy ids for parity_cases.prompts(), per architecture, computed once."""
    import transformers

    from parity_cases import NUM_TOKENS, prompts
    cache = {}

    def get(arch):
        if arch not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
            cache[arch] = hf_greedy(model, prompts(), NUM_TOKENS)
        return cache[arch]
    return get


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


@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    from engine.config import EngineConfig
    server = LiveServer(EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_model_len=256,
                                     served_model_name="tiny"))
    yield server
    server.stop()
    assert_no_leak(server.engine)


def metric_sum(url: str, name: str) -> float:
    """The sum of a metric's series on a live server's /metrics."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    samples = [s.value for family in text_string_to_metric_families(httpx.get(url + "/metrics").text)
               for s in family.samples if s.name == name]
    if not samples:
        raise KeyError(name)
    return sum(samples)
