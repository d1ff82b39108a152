"""A request is validated once in each process, where it enters it, and n > 1 fans out in
exactly one place per mode: the engine (colocated), semi-PD (its samples are separate
requests to both streams), the disaggregated front door (workers refuse n > 1)."""

import queue

import pytest

from engine.config import EngineConfig
from engine.engine import Engine
from engine.errors import RequestError
from engine.sampling_params import SamplingParams
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop
from engine.worker.semi_pd import SemiPD
from scheduler.engine_client import InProcessClient

from helpers import assert_no_leak
from parity_cases import prompts


@pytest.fixture
def counted(monkeypatch):
    """Records each Engine.validate, add_request and reserve_prefilled call (n of its params)."""
    calls: dict[str, list[int]] = {"validate": [], "add_request": [], "reserve_prefilled": []}
    for name in calls:
        original = getattr(Engine, name)

        def spy(self, request_id_or_ids, *args, _name=name, _original=original, **kwargs):
            params = next(a for a in (*args, *kwargs.values()) if isinstance(a, SamplingParams))
            calls[_name].append(params.n)
            return _original(self, request_id_or_ids, *args, **kwargs)
        monkeypatch.setattr(Engine, name, spy)
    return calls


def drain(client: InProcessClient, prompt, params) -> list:
    import asyncio

    async def run():
        client.check(prompt, params)
        return [o async for o in client.generate("r", prompt, params)]
    return asyncio.run(run())


def config(tiny_llama) -> EngineConfig:
    return EngineConfig(model=str(tiny_llama), num_kv_blocks=128, max_model_len=256, num_threads=1)


def test_colocated_validates_once_and_the_engine_fans_out(tiny_llama, counted):
    loop = EngineLoop(Engine(config(tiny_llama))).start()
    try:
        outs = drain(InProcessClient(loop, "tiny"), prompts()[0], SamplingParams(n=3, max_tokens=4, seed=1))
        assert sorted({o.index for o in outs}) == [0, 1, 2]
        assert counted["validate"] == [3] and counted["add_request"] == [3]
    finally:
        loop.shutdown()
    assert_no_leak(loop.engine)


def test_semi_pd_validates_once_and_fans_out_itself(tiny_llama, counted):
    semi = SemiPD(config(tiny_llama), controller=None).start()
    try:
        outs = drain(InProcessClient(semi, "tiny"), prompts()[0], SamplingParams(n=3, max_tokens=4, seed=1))
        assert sorted({o.index for o in outs}) == [0, 1, 2]
        assert counted["validate"] == [3]  # once, for the request as a whole
        assert counted["reserve_prefilled"] == [1, 1, 1] and counted["add_request"] == [1, 1, 1]
    finally:
        semi.shutdown()


def test_a_decode_worker_validates_once_and_refuses_n_above_one(tiny_llama, counted):
    loop = EngineLoop(Engine(config(tiny_llama))).start()
    role = DecodeRole(loop)
    try:
        with pytest.raises(RequestError, match="n=1"):
            role.generate("many", prompts()[0], SamplingParams(n=2), lambda rid, cached, tid: None, lambda out: None)
        got: queue.Queue = queue.Queue()
        role.generate_local("one", prompts()[0], SamplingParams(max_tokens=2), got.put)
        while not got.get(timeout=30).finished:
            pass
        assert counted["validate"] == [1] and counted["add_request"] == [1]
    finally:
        loop.shutdown()
    assert_no_leak(loop.engine)
