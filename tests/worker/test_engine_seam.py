"""The worker layer drives any engine that implements engine.interface.WorkerEngine: our
engine does, and so does a fake with no model, under the real loop and decode role."""

import queue
from concurrent.futures import Future

import torch

from engine.config import EngineConfig
from engine.engine import Engine
from engine.interface import WorkerEngine
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from engine.transfer.base import LayerChunk
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop

from helpers import FakeEngine


def drain(q: queue.Queue, n: int = 1) -> list[StepOutput]:
    outs, finished = [], 0
    while finished < n:
        out = q.get(timeout=10)
        assert not isinstance(out, Exception), out
        outs.append(out)
        finished += out.finished
    return outs


def test_both_engines_implement_the_interface(tiny_llama):
    assert isinstance(Engine(EngineConfig(model=str(tiny_llama), num_kv_blocks=32, max_model_len=128)), WorkerEngine)
    assert isinstance(FakeEngine(), WorkerEngine)
    from engine.vllm_backend.engine import VllmEngine  # built in tests/vllm/; here its class has every member
    members = {m for m in dir(WorkerEngine) if not m.startswith("_")} - {"info"}
    assert members <= set(dir(VllmEngine)), members - set(dir(VllmEngine))


def test_the_loop_and_the_decode_role_drive_a_fake_engine():
    engine = FakeEngine()
    loop = EngineLoop(engine).start()
    try:
        got: queue.Queue = queue.Queue()
        loop.submit("a", [5, 6], SamplingParams(n=2, max_tokens=3), got.put)
        outs = drain(got, 2)
        assert sorted((o.index, o.new_token_ids[0]) for o in outs) == [(0, 1), (0, 2), (0, 3), (1, 1), (1, 2), (1, 3)]

        role = DecodeRole(loop)
        first: Future = Future()
        started: queue.Queue = queue.Queue()

        def start_prefill(request_id: str, cached_blocks: int, transfer_id: int) -> Future:
            started.put((request_id, cached_blocks))
            return first
        got = queue.Queue()
        role.generate("d", [5, 6, 7], SamplingParams(max_tokens=3), start_prefill, got.put)
        assert started.get(timeout=10) == ("d", 0)
        role.land(LayerChunk("d", 0, 0, torch.zeros(2, 1, 16, 1, 8), last=True))
        first.set_result(StepOutput("d", 0, [42]))
        assert [o.new_token_ids[0] for o in drain(got)] == [42, 2, 3]  # the prefill side's token, then decodes
        assert loop.call(lambda e: e.num_requests()).result(10) == 0 and role.num_deadlines == 0
    finally:
        loop.shutdown()
