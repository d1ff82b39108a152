"""KV over gloo between two processes: a prefill engine in a child process, the decode
engine here; greedy outputs equal HF, every block freed, a stalled transfer times out."""

import multiprocessing as mp

import pytest

from engine.transfer.gloo import DECODE_RANK, GlooReceiver, TransferTimeout, connect_pair, listen

from disagg_procs import join_and_stall, prefill_over_gloo
from parity_cases import GREEDY, prompts

pytestmark = pytest.mark.slow


def receiver_for(decode, port: int, listen_fd: int, timeout_s: float) -> GlooReceiver:
    """Joins the pair as the decode rank (blocks until the prefill rank joins too)."""
    cfg = decode.model_config
    return GlooReceiver(connect_pair("127.0.0.1", port, DECODE_RANK, listen_fd=listen_fd),
                        (decode.config.block_size, cfg.num_kv_heads, cfg.head_dim),
                        decode.runner.kv_cache.tensor.dtype, timeout_s=timeout_s)


def test_1p1d_across_processes_equals_hf(tiny_llama, references, make_engine):
    decode = make_engine(model=str(tiny_llama))
    prompt_list = prompts()
    port, fd = listen("127.0.0.1")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    child = ctx.Process(target=prefill_over_gloo, args=(str(tiny_llama), port, dict(enumerate(prompt_list)), results))
    child.start()
    try:
        receiver = receiver_for(decode, port, fd, timeout_s=60)
        for i, p in enumerate(prompt_list):
            assert decode.reserve_prefilled(str(i), p, GREEDY) is not None
            receiver.expect(i, str(i))
        landed = set()
        while len(landed) < len(prompt_list):
            chunk = receiver.recv()
            assert decode.receive_kv(chunk)
            if chunk.last:
                landed.add(chunk.request_id)
        first = results.get(timeout=60)
        out = {}
        for i in range(len(prompt_list)):
            out[i] = decode.admit_prefilled(str(i), first[i]).new_token_ids
        while decode.has_unfinished():
            for o in decode.step():
                out[int(o.request_id)].extend(o.new_token_ids)
        assert [out[i] for i in range(len(prompt_list))] == references("llama")
        assert results.get(timeout=30) == "done"  # the prefill side freed every block too
        child.join(30)
        assert child.exitcode == 0
    finally:
        child.kill()
        child.join(10)


def test_a_stalled_transfer_times_out_and_the_request_can_be_freed(tiny_llama, make_engine):
    decode = make_engine(model=str(tiny_llama))
    port, fd = listen("127.0.0.1")
    ctx = mp.get_context("spawn")
    peer = ctx.Process(target=join_and_stall, args=(port,))
    peer.start()
    try:
        receiver = receiver_for(decode, port, fd, timeout_s=1)
        assert decode.reserve_prefilled("r", prompts()[-1], GREEDY) is not None
        with pytest.raises(TransferTimeout, match="within 1 s"):
            receiver.recv()
        decode.abort("r")  # what the decode worker does with a request whose KV never came
        assert decode.kv.num_used_blocks == 0
    finally:
        peer.kill()
        peer.join(10)

