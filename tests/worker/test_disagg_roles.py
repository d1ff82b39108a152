"""Prefill and decode roles on two engine loops (threads, loopback KV): outputs equal HF;
the decode side's bounded wait for blocks, refusals, failed prefills, transfer timeouts and
aborts each end the request they touch, free its blocks and leave the rest running."""

from concurrent.futures import Future

import pytest

from engine.config import DEFAULT_BLOCK_SIZE, EngineConfig, WorkerOptions
from engine.engine import Engine, StepOutput
from engine.errors import EngineError, Overloaded, RequestError
from engine.sampling_params import SamplingParams
from engine.transfer.base import KVSink
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop
from engine.worker.prefill_role import PrefillRole

from helpers import Collector, assert_no_leak, stalled
from parity_cases import GREEDY, prompts


class ToDecode(KVSink):
    def __init__(self, role):
        self.role = role

    def send(self, chunk):
        self.role.land(chunk)


@pytest.fixture
def pair(tiny_llama):
    def make(decode_blocks=128, max_pending=64, timeout_s=30.0):
        base = dict(model=str(tiny_llama), max_model_len=256, max_num_batched_tokens=64)
        p_engine = Engine(EngineConfig(num_kv_blocks=128, **base))
        d_engine = Engine(EngineConfig(num_kv_blocks=decode_blocks, **base))
        prefill, decode_worker = PrefillRole(EngineLoop(p_engine)), EngineLoop(d_engine)
        decode = DecodeRole(decode_worker, WorkerOptions(max_waiting_for_blocks=max_pending, transfer_timeout_s=timeout_s))
        prefill.loop.start()
        decode_worker.start()
        made.append((prefill, decode))
        return prefill, decode

    made = []
    yield make
    for prefill, decode in made:
        prefill.loop.shutdown()
        decode.loop.shutdown()
        assert_no_leak(prefill.loop.engine)
        assert_no_leak(decode.loop.engine)
        assert decode.num_deadlines == 0 and decode.num_pending == 0


def submit(prefill, decode, rid, prompt, params=GREEDY):
    sink = Collector()
    decode.generate(rid, prompt, params,
                    lambda r, skip, tid: prefill.prefill(r, prompt, params, ToDecode(decode), skip), sink)
    return sink


def test_disaggregated_roles_equal_hf(pair, references):
    prefill, decode = pair()
    sinks = [submit(prefill, decode, str(i), p) for i, p in enumerate(prompts())]
    for s in sinks:
        assert s.done.wait(60) and s.error is None
    assert [s.tokens for s in sinks] == references("llama")


def test_requests_wait_for_blocks_then_run_and_a_full_queue_refuses(pair, references):
    prefill, decode = pair(decode_blocks=512 // DEFAULT_BLOCK_SIZE, max_pending=1)
    long_prompt = prompts()[-1]  # 200 tokens + 32 out: 232 of 512 tokens' blocks, so two fit
    sinks = []
    for i in range(3):  # the third waits for blocks in the queue
        sinks.append(submit(prefill, decode, str(i), long_prompt))
        decode.loop.call(lambda e: None).result(5)  # the loop has tried to reserve it
    assert decode.num_pending == 1
    with pytest.raises(Overloaded) as refused:
        submit(prefill, decode, "3", long_prompt)
    assert refused.value.status_code == 503
    for s in sinks:
        assert s.done.wait(60) and s.error is None
        assert s.tokens == references("llama")[-1]


def test_a_burst_of_arrivals_is_not_a_full_queue(pair):
    """200 requests arrive before the loop tries any (held between steps), every block free:
    the bound counts requests that found no room, so none is refused."""
    prefill, decode = pair(decode_blocks=512, max_pending=4)
    with stalled(decode.loop):
        sinks = [submit(prefill, decode, str(i), [5, 6, 7], SamplingParams(temperature=0, max_tokens=2))
                 for i in range(200)]
    for s in sinks:
        assert s.done.wait(60) and s.error is None and len(s.tokens) == 2


def test_arrivals_beyond_the_bound_are_refused_once_blocks_run_out(pair):
    prefill, decode = pair(decode_blocks=512 // DEFAULT_BLOCK_SIZE, max_pending=1)
    long_prompt = prompts()[-1]  # 232 of 512 tokens' blocks each: two fit
    with stalled(decode.loop):
        sinks = [submit(prefill, decode, str(i), long_prompt) for i in range(5)]
    for s in sinks:
        assert s.done.wait(60)
    refused = [s for s in sinks if isinstance(s.error, Overloaded)]
    assert len(refused) == 2 and all(s.error is None for s in sinks if s not in refused)


def test_a_failed_prefill_fails_only_its_request(pair, references):
    prefill, decode = pair()

    def broken(_rid, _skip, _transfer_id):
        f = Future()
        f.set_exception(RuntimeError("prefill worker died"))
        return f

    bad = Collector()
    decode.generate("bad", prompts()[1], GREEDY, broken, bad)
    good = submit(prefill, decode, "good", prompts()[0])
    assert bad.done.wait(10) and isinstance(bad.error, EngineError) and "prefill worker died" in str(bad.error)
    assert good.done.wait(30) and good.tokens == references("llama")[0]


def test_a_request_whose_own_filters_leave_no_token_is_refused_not_failed(pair, references):
    """Its prefill's first draw has nothing to sample: the client gets the request's fault (a 400),
    not the engine's, and the request beside it runs on."""
    prefill, decode = pair()
    bad = submit(prefill, decode, "bad", prompts()[1],
                 SamplingParams(temperature=0, max_tokens=4, allowed_token_ids=[5], bad_words_ids=[[5]]))
    good = submit(prefill, decode, "good", prompts()[0])
    assert bad.done.wait(30) and isinstance(bad.error, RequestError) and "no token is left" in str(bad.error)
    assert good.done.wait(30) and good.tokens == references("llama")[0]


def test_kv_that_never_arrives_times_out(pair):
    _, decode = pair(timeout_s=0.5)

    def first_token_only(rid, _skip, _transfer_id):  # a prefill that answers but whose KV is lost on the way
        f = Future()
        f.set_result(StepOutput(rid, 0, [7], finish_reason="length"))
        return f

    sink = Collector()
    decode.generate("lost", prompts()[3], GREEDY, first_token_only, sink)
    assert sink.done.wait(10) and "no progress for 0.5 s" in str(sink.error)


def test_abort_while_waiting_for_kv_frees_both_sides(pair):
    prefill, decode = pair()
    never = Future()  # the prefill has not answered yet
    sink = Collector()
    decode.generate("r", prompts()[-1], GREEDY, lambda rid, skip, transfer_id: never, sink)
    decode.loop.call(lambda e: None).result(5)  # the reservation happened
    assert decode.loop.engine.kv.num_used_blocks > 0
    decode.abort("r")
    decode.loop.call(lambda e: None).result(5)
    assert decode.loop.engine.kv.num_used_blocks == 0
    assert never.cancelled()  # the prefill side is told to drop it
