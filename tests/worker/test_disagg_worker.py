"""Two engine loops (threads) as a prefill and a decode worker: KV chunks and admissions
enter the decode engine through `call`, between its steps; outputs equal HF."""

import queue
import threading

from engine.config import EngineConfig
from engine.engine import Engine
from engine.sampling_params import SamplingParams
from engine.transfer.base import KVSink
from engine.worker.loop import EngineLoop

from helpers import assert_no_leak
from parity_cases import GREEDY, prompts


def test_prefill_and_decode_workers_equal_hf(tiny_llama, references):
    cfg = EngineConfig(model=str(tiny_llama), num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=64)
    prefill_engine, decode_engine = Engine(cfg), Engine(cfg)
    decode = EngineLoop(decode_engine).start()
    landed = {str(i): threading.Event() for i in range(len(prompts()))}

    class ToDecode(KVSink):
        def send(self, chunk):
            done = decode.call(lambda engine: engine.receive_kv(chunk))
            if chunk.last:  # calls run in order: every earlier chunk of the request has landed
                done.add_done_callback(lambda _: landed[chunk.request_id].set())

    prefill_engine.set_kv_sink(ToDecode())
    prefill = EngineLoop(prefill_engine).start()
    firsts: queue.Queue = queue.Queue()
    outputs: dict[str, list[int]] = {rid: [] for rid in landed}
    finished = threading.Semaphore(0)

    def decode_sink(out):
        outputs[out.request_id].extend(out.new_token_ids)
        if out.finished:
            finished.release()

    try:
        for i, p in enumerate(prompts()):
            assert decode.call(lambda engine, i=i, p=p: engine.reserve_prefilled(str(i), p, GREEDY)).result(10) is not None
            prefill.submit(str(i), p, SamplingParams(temperature=0, max_tokens=1), firsts.put)
        for _ in landed:
            first = firsts.get(timeout=30)
            assert landed[first.request_id].wait(30)

            def admit(engine, rid=first.request_id, token=first.new_token_ids[0]):
                decode.attach(rid, decode_sink)
                decode_sink(engine.admit_prefilled(rid, token))
            decode.call(admit).result(10)
        for _ in landed:
            assert finished.acquire(timeout=60)
        assert [outputs[str(i)] for i in range(len(landed))] == references("llama")
    finally:
        prefill.shutdown()
        decode.shutdown()
    assert_no_leak(prefill_engine)
    assert_no_leak(decode_engine)


def test_a_request_waiting_for_kv_does_not_make_the_loop_spin(tiny_llama):
    engine = Engine(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256))
    worker = EngineLoop(engine).start()
    steps = {"n": 0}
    real = engine.step

    def counted():
        steps["n"] += 1
        return real()
    engine.step = counted
    try:
        assert worker.call(lambda e: e.reserve_prefilled("r", [5, 6, 7], GREEDY)).result(10) is not None
        threading.Event().wait(0.3)
        assert steps["n"] <= 1  # asleep on its condition, not stepping an empty batch
        worker.call(lambda e: e.abort("r")).result(10)
    finally:
        worker.shutdown()
    assert_no_leak(engine)
