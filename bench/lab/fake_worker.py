"""A worker with a fake engine: the real gRPC servicer (engine/worker/servicer.py) in front of a decode
role that answers every request at once with `max_tokens` tokens. It registers with the
global scheduler like a real worker, so the front door and scheduler can be timed with the
engine's own time taken out (bench/lab/scheduler_overhead.py)."""

from __future__ import annotations

import os
import uuid
from types import SimpleNamespace

from engine.outputs import EngineStats, StepOutput, Timeline

NUM_BLOCKS = 1 << 20


class FakeDecodeRole:
    """generate() hands the sink every output at once; nothing is held, nothing to abort."""

    num_pending = 0
    max_pending = NUM_BLOCKS

    def generate(self, request_id, prompt_token_ids, params, start_prefill, sink, validated=False) -> None:
        self.generate_local(request_id, prompt_token_ids, params, sink)

    def generate_local(self, request_id, prompt_token_ids, params, sink) -> None:
        n = params.max_tokens or 1
        for i in range(n):
            last = i == n - 1
            sink(StepOutput(request_id, 0, [1 + i % 100], finish_reason="length" if last else None,
                            num_prompt_tokens=len(prompt_token_ids), timeline=Timeline() if last else None))

    def abort(self, request_id: str) -> None:
        pass


class FakeEngineLoop:
    engine = SimpleNamespace(has_request=lambda request_id: False, info=SimpleNamespace(block_size=16))

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 0, NUM_BLOCKS, 0, 0)

    def abort(self, request_id: str) -> None:
        pass


class FakePeers:
    def starter(self, *args):
        return None


class FakeWorkerActor:
    """Ray actor: a fake prefill or decode worker registered with the scheduler."""

    def __init__(self, worker_id: str, role: str, scheduler, max_model_len: int = 4096, vocab_size: int = 32000):
        import ray

        from engine.worker.servicer import WorkerServicer, start_server
        from scheduler.global_scheduler import WorkerInfo

        host = ray.util.get_node_ip_address()
        decode = FakeDecodeRole() if role == "decode" else None
        incarnation = uuid.uuid4().hex[:12]
        self.service = WorkerServicer(worker_id, incarnation, FakeEngineLoop(), role, decode, None, FakePeers())
        self.server, port = start_server(self.service, host, max_workers=64)
        self.info = WorkerInfo(worker_id, role, f"{host}:{port}", incarnation, os.getpid(), max_model_len,
                               vocab_size, 16, NUM_BLOCKS)
        ray.get(scheduler.register.remote(self.info))

    def describe(self):
        return self.info
