"""Prefill engine → decode engine in one process over the loopback transport: greedy
outputs equal colocated and HF, chunks cover every prompt block, aborts free both sides."""

import time

import pytest

from engine.config import DEFAULT_BLOCK_SIZE
from engine.sampling_params import SamplingParams
from engine.transfer.loopback import LoopbackSink

from helpers import run_to_end
from parity_cases import GREEDY, PROMPT_LENS, prompts


def run_1p1d(prefill, decode, prompt_list, params):
    """The decode engine reserves, the prefill engine computes the prompt (max_tokens=1) and
    ships its KV layer by layer, the decode engine admits it with the first token."""
    out = {str(i): [] for i in range(len(prompt_list))}
    for i, p in enumerate(prompt_list):
        assert decode.reserve_prefilled(str(i), p, params) is not None
        prefill.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=1))
    steps = 0
    while prefill.has_unfinished() or decode.has_unfinished():
        for o in prefill.step():
            if o.finished:  # prompt done, every layer sent: the first token moves to decode
                first = decode.admit_prefilled(o.request_id, o.new_token_ids[0])
                out[o.request_id].extend(first.new_token_ids)
        for o in decode.step():
            out[o.request_id].extend(o.new_token_ids)
        steps += 1
        assert steps < 10_000
    return [out[str(i)] for i in range(len(prompt_list))]


@pytest.mark.parametrize("prefill_setting", [dict(), dict(max_num_batched_tokens=24), dict(block_size=8),
                                             dict(prefill_schedule="whole"), dict(prefill_schedule="layered")])
def test_1p1d_equals_colocated_and_hf(prefill_setting, tiny_llama, references, make_engine, monkeypatch):
    from engine import batcher
    monkeypatch.setattr(batcher, "_GROUPS", ((16, 1), (64, 2), (128, 3)))  # a layered cohort in 3 groups
    block_size = prefill_setting.get("block_size", DEFAULT_BLOCK_SIZE)
    prefill = make_engine(model=str(tiny_llama), **prefill_setting)
    decode = make_engine(model=str(tiny_llama), block_size=block_size)
    sink = LoopbackSink(decode)
    prefill.set_kv_sink(sink)
    got = run_1p1d(prefill, decode, prompts(), GREEDY)
    assert got == references("llama")
    # every layer of every prompt block arrived, blocks counted by index in the request
    layers = prefill.model_config.num_layers
    for i, n in enumerate(PROMPT_LENS):
        covered = {(layer, b) for rid, layer, first, num in sink.chunks if rid == str(i)
                   for b in range(first, first + num)}
        assert covered == {(layer, b) for layer in range(layers) for b in range(-(-n // block_size))}


def test_layers_are_sent_while_the_forward_runs(tiny_llama, make_engine):
    prefill = make_engine(model=str(tiny_llama))
    decode = make_engine(model=str(tiny_llama))
    sent_s = []

    class Timed(LoopbackSink):
        def send(self, chunk):
            sent_s.append((chunk.layer, time.monotonic()))
            super().send(chunk)

    prefill.set_kv_sink(Timed(decode))
    p = prompts()[-1]
    decode.reserve_prefilled("r", p, GREEDY)
    prefill.add_request("r", p, SamplingParams(temperature=0, max_tokens=1))
    out = prefill.step()
    end_s = time.monotonic()
    layers = prefill.model_config.num_layers
    assert [layer for layer, _ in sent_s] == list(range(layers))
    # layer 0 went out before the last layer's compute ended (it ended before its own send)
    assert sent_s[0][1] < sent_s[-1][1] <= end_s
    decode.admit_prefilled("r", out[0].new_token_ids[0])
    decode.abort("r")


def test_abort_while_waiting_for_kv_frees_blocks_and_drops_late_chunks(tiny_llama, make_engine):
    prefill = make_engine(model=str(tiny_llama))
    decode = make_engine(model=str(tiny_llama))
    prefill.set_kv_sink(LoopbackSink(decode))
    p = prompts()[-1]
    assert decode.reserve_prefilled("r", p, GREEDY) is not None
    assert decode.kv.num_used_blocks == -(-len(p) // DEFAULT_BLOCK_SIZE)
    decode.abort("r")
    assert decode.kv.num_used_blocks == 0
    prefill.add_request("r", p, SamplingParams(temperature=0, max_tokens=1))
    while prefill.has_unfinished():
        prefill.step()  # its chunks find no request and are dropped
    assert decode.admit_prefilled("r", 1) is None
    with pytest.raises(Exception, match="n=1"):
        decode.reserve_prefilled("x", p, SamplingParams(n=2))


def test_no_room_to_reserve_changes_nothing(tiny_llama, make_engine):
    decode = make_engine(model=str(tiny_llama), num_kv_blocks=32, max_model_len=256, block_size=16)
    p = prompts()[-1]  # 13 blocks
    assert decode.reserve_prefilled("a", p, GREEDY) is not None and decode.reserve_prefilled("b", p, GREEDY) is not None
    assert decode.reserve_prefilled("c", p, GREEDY) is None
    assert "c" not in decode.requests and decode.kv.num_used_blocks == 26
    decode.abort("a")
    decode.abort("b")


def test_a_prefix_cached_on_the_decode_side_is_not_sent_again(tiny_llama, make_engine):
    """Prefix-aware routing: the decode engine reserves the prompt over its cached prefix and
    the prefill engine ships only the blocks after it; the output equals colocated serving."""
    prefill = make_engine(model=str(tiny_llama))
    decode = make_engine(model=str(tiny_llama))
    colocated = make_engine(model=str(tiny_llama))

    class Held(LoopbackSink):  # what the decode worker tells the prefill worker it holds
        def blocks_held(self, request_id):
            return decode.requests[request_id][0].num_cached_tokens // DEFAULT_BLOCK_SIZE

    sink = Held(decode)
    prefill.set_kv_sink(sink)
    shared = prompts()[-1][:3 * DEFAULT_BLOCK_SIZE + 2]  # 3 full blocks and 2 tokens
    first, second = shared + [7, 8, 9], shared + [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]
    got = run_1p1d(prefill, decode, [first], GREEDY)
    assert decode.kv.num_used_blocks == 0  # finished, its blocks stay cached (free, evictable)
    sink.chunks.clear()
    assert decode.reserve_prefilled("1", second, GREEDY) is not None
    assert decode.requests["1"][0].num_cached_tokens == 3 * DEFAULT_BLOCK_SIZE
    prefill.add_request("1", second, SamplingParams(temperature=0, max_tokens=1))
    out = []
    while prefill.has_unfinished() or decode.has_unfinished():
        for o in prefill.step():
            if o.finished:
                out.extend(decode.admit_prefilled(o.request_id, o.new_token_ids[0]).new_token_ids)
        for o in decode.step():
            out.extend(o.new_token_ids)
    assert {first_block for _, _, first_block, _ in sink.chunks} == {3}  # blocks 0-2 stayed home
    assert decode.requests == {} and decode.kv.num_used_blocks == 0
    reference = run_to_end(colocated, [first, second], GREEDY)
    assert got == [reference["0"]] and out == reference["1"]
