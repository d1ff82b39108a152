"""The transfer deadline counts stalls, not queueing: a decode worker and a prefill worker in
one process, over the real gRPC service and gloo link. A request queued at a busy prefill
worker for many times `transfer_timeout_s` completes, equal to HF; one whose prefill worker
stops working fails with the reason within a few timeouts, and both sides free its blocks."""

import threading
import time

import pytest

from engine.config import EngineConfig, WorkerOptions
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop
from engine.worker.peers import PrefillPeers
from engine.worker.prefill_role import PrefillRole
from engine.worker.servicer import WorkerServicer, start_server

from helpers import Collector, assert_no_leak, wait_for
from parity_cases import GREEDY, prompts

TIMEOUT_S = 0.3


class Pair:
    def __init__(self, tiny_llama):
        base = dict(model=str(tiny_llama), max_model_len=256, max_num_batched_tokens=64, num_kv_blocks=128)
        # one sequence at a time on the prefill side: a request queues behind the one running
        self.p_worker = EngineLoop(Engine(EngineConfig(max_num_seqs=1, **base)))
        self.throttle = threading.Event()  # while set, each of the prefill loop's iterations takes 10 ms more
        self.p_worker.add_hook(lambda engine: self.throttle.is_set() and time.sleep(0.01))
        self.p_worker.start()
        self.service = WorkerServicer("prefill-0", "i0", self.p_worker, "prefill", prefill=PrefillRole(self.p_worker))
        self.server, port = start_server(self.service, "127.0.0.1", max_workers=16)
        self.address = f"127.0.0.1:{port}"
        d_engine = Engine(EngineConfig(**base))
        self.d_worker = EngineLoop(d_engine)
        self.probes: list[bool] = []
        self.decode = DecodeRole(self.d_worker, WorkerOptions(transfer_timeout_s=TIMEOUT_S), probe=self._probe)
        cfg = d_engine.model_config
        self.client = PrefillPeers("decode-0", "127.0.0.1", self.decode,
                                    (d_engine.config.block_size, cfg.num_kv_heads, cfg.head_dim),
                                    d_engine.runner.kv_cache.tensor.dtype, reroute=lambda failed: None,
                                    probe_timeout_s=2.0)
        self.d_worker.start()

    def _probe(self, request_id: str) -> bool:
        answer = self.client.progressing(request_id)
        self.probes.append(answer)
        return answer

    def generate(self, rid: str, prompt: list[int]) -> Collector:
        sink = Collector()
        start = self.client.starter("prefill-0", self.address, prompt, GREEDY)
        self.decode.generate(rid, prompt, GREEDY, start, sink)
        return sink

    def close(self) -> None:
        engines = (self.p_worker.engine, self.d_worker.engine)
        deadline = time.monotonic() + 30
        while any(e.has_unfinished() or e.kv.num_used_blocks for e in engines) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.server.stop(0).wait(5)
        self.client.close()
        self.p_worker.shutdown()
        self.d_worker.shutdown()
        for engine in engines:
            assert_no_leak(engine)
        assert self.decode.num_deadlines == 0 and self.decode.num_pending == 0


@pytest.fixture
def pair(tiny_llama):
    made = Pair(tiny_llama)
    yield made
    made.close()


def test_a_request_queued_at_a_busy_prefill_worker_waits_past_the_timeout(pair, references):
    hogs = [Collector() for _ in range(3)]  # colocated requests ahead of it on the prefill worker
    pair.throttle.set()  # busy however fast the machine: the hogs outlast several timeouts
    for i, hog in enumerate(hogs):
        pair.p_worker.submit(f"hog-{i}", prompts()[0], SamplingParams(max_tokens=200, ignore_eos=True), hog)
    pair.p_worker.call(lambda e: None).result(5)  # they are in before it
    sink = pair.generate("queued", prompts()[2])
    # several timeouts pass while it queues; each time the prefill worker shows it at work
    wait_for(lambda: pair.probes.count(True) >= 2, "two probes that find the prefill worker at work", 60)
    assert not sink.done.is_set()
    pair.throttle.clear()
    assert sink.done.wait(120) and sink.error is None, sink.error
    assert sink.tokens == references("llama")[2]
    assert all(h.done.is_set() and h.error is None for h in hogs)  # it ran after them: it waited


def test_a_request_at_a_stalled_prefill_worker_fails_within_a_few_timeouts(pair, references):
    stall = threading.Event()
    pair.p_worker.call(lambda e: stall.wait(30))  # the prefill worker's loop stops turning
    try:
        sink = pair.generate("stalled", prompts()[2])
        assert sink.done.wait(30), "the stalled request did not end"
        assert "no progress for 0.3 s" in str(sink.error)
        assert pair.probes[-1] is False  # the worker answered, but its loop had not moved
    finally:
        stall.set()
    ok = pair.generate("after", prompts()[1])  # the worker recovered: the next one runs
    assert ok.done.wait(60) and ok.error is None and ok.tokens == references("llama")[1]
