"""Disaggregated serving between tensor-parallel workers (CPU, gloo, loopback, the tiny
Llama: 8 query heads, 2 KV heads): a prefill worker of A ranks and a decode worker of B ranks
in this process (their other ranks spawned), over the real gRPC service and KV link. Greedy
outputs equal HF's (what colocated serving gives); every decode rank holds exactly its KV
heads, equal to a colocated run's; aborts at any point leave no blocks and no transfer on any
rank; a decode rank killed fails its requests within seconds and the group serves again."""

import os
import queue
import random
import signal
import threading
import time

import grpc
import pytest
import torch

from engine.config import EngineConfig, Role, WorkerOptions
from engine.engine import Engine
from engine.parallel.shard import kv_heads
from engine.sampling_params import SamplingParams
from engine.worker import wire
from engine.worker.build import build_worker
from pdserve_rpc import worker_pb2 as pb
from pdserve_rpc import worker_pb2_grpc as pb_grpc

from helpers import assert_no_leak, gated, wait_for
from parity_cases import GREEDY, PROMPT_LENS, prompts

PROBE = list(range(3, 60))  # a prompt none of the others shares a block with


class Pair:
    def __init__(self, model, prefill_tp: int, decode_tp: int):
        base = dict(model=str(model), max_model_len=256, num_kv_blocks=96, max_num_batched_tokens=64)
        options = WorkerOptions(transfer_timeout_s=5.0)
        self.prefill = build_worker("prefill-0", Role.PREFILL, EngineConfig(tensor_parallel_size=prefill_tp, **base),
                                    "127.0.0.1", lambda failed: None, options)
        self.decode = build_worker("decode-0", Role.DECODE, EngineConfig(tensor_parallel_size=decode_tp, **base),
                                   "127.0.0.1", lambda failed: None, options)
        self.channel = grpc.insecure_channel(self.decode.address)
        self.stub = pb_grpc.WorkerStub(self.channel)

    def call(self, rid: str, prompt: list[int], params: SamplingParams = GREEDY):
        request = pb.GenerateRequest(request_id=rid, prompt_token_ids=prompt, params=wire.params_to_proto(params),
                                     prefill_worker=self.prefill.worker_id, prefill_address=self.prefill.address)
        return self.stub.Generate(request, timeout=120)

    def generate(self, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list[int]:
        tokens = []
        for delta in self.call(rid, prompt, params):
            assert not delta.error, delta.error
            tokens += delta.token_ids
        return tokens

    def engines(self) -> list[Engine]:
        return [self.prefill.loop.engine, self.decode.loop.engine]

    def idle(self) -> bool:
        return all(not e.has_unfinished() and e.kv.num_used_blocks == 0 for e in self.engines())

    def reports(self, engine: Engine) -> list[dict]:
        if engine.runner.ranks is None:
            return []
        loop = self.prefill.loop if engine is self.prefill.loop.engine else self.decode.loop
        return loop.call(lambda e: e.runner.ranks.report()).result(30)

    def stop(self) -> None:
        procs = [p for e in self.engines() if e.runner.ranks for p in e.runner.ranks.procs]
        self.channel.close()
        self.decode.stop()
        self.prefill.stop()
        for engine in self.engines():
            assert_no_leak(engine)
        assert [p.exitcode for p in procs] == [0] * len(procs)  # every other rank stopped when told


@pytest.fixture
def make_pair(tiny_llama):
    made = []

    def make(prefill_tp: int, decode_tp: int) -> Pair:
        made.append(Pair(tiny_llama, prefill_tp, decode_tp))
        return made[-1]
    yield make
    for pair in made:
        pair.stop()


def colocated_kv(model, prompt: list[int]) -> torch.Tensor:
    """The prompt's KV as one rank computes it colocated: [layers, 2, tokens, KV heads, head_dim]."""
    engine = Engine(EngineConfig(model=str(model), max_model_len=256, num_kv_blocks=32))
    engine.add_request("ref", prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    engine.step()
    blocks = engine.requests["ref"][0].block_ids
    return _tokens(torch.stack([engine.runner.kv_cache.export_blocks(i, blocks) for i in range(engine.model_config.num_layers)]),
                   len(prompt))


def _tokens(kv: torch.Tensor, n: int) -> torch.Tensor:
    """[layers, 2, blocks, block_size, h, d] -> the first n tokens' [layers, 2, n, h, d]."""
    layers, two, blocks, bs, h, d = kv.shape
    return kv.reshape(layers, two, blocks * bs, h, d)[:, :, :n]


@pytest.mark.parametrize("prefill_tp,decode_tp", [(2, 1), (1, 2), (2, 2)])
def test_outputs_equal_colocated_and_each_decode_rank_holds_its_heads(make_pair, tiny_llama, references,
                                                                      prefill_tp, decode_tp):
    pair = make_pair(prefill_tp, decode_tp)
    results: dict[str, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i, p=p: results.__setitem__(str(i), pair.generate(str(i), p)))
               for i, p in enumerate(prompts())]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [results.get(str(i)) for i in range(len(PROMPT_LENS))] == references("llama")

    # the probe's blocks, as the decode worker reserved them, read back from every rank once it is done
    decode = pair.decode.loop.engine
    seen: dict[str, list[int]] = {}
    admit = decode.admit_prefilled
    decode.admit_prefilled = lambda rid, *a: (seen.setdefault(rid, list(decode.requests[rid][0].block_ids)), admit(rid, *a))[1]
    pair.generate("probe", PROBE, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    blocks = seen["probe"]
    own = torch.stack([decode.runner.kv_cache.export_blocks(i, blocks) for i in range(decode.model_config.num_layers)])
    others = pair.decode.loop.call(lambda e: e.runner.ranks.read_kv(blocks)).result(30) if decode_tp > 1 else []
    want = colocated_kv(tiny_llama, PROBE)
    num_kv_heads = decode.model_config.num_kv_heads
    for rank, got in enumerate([own, *others]):
        heads = kv_heads(num_kv_heads, rank, decode_tp)
        assert got.shape[4] == len(heads)  # this rank's heads only
        torch.testing.assert_close(_tokens(got, len(PROBE)), want[:, :, :, heads.start:heads.stop], rtol=1e-4, atol=1e-5)
    held = [{k: r[k] for k in ("links", "expected", "staged")} for r in pair.reports(decode)]
    assert decode.requests == {} and held == [{"links": 1, "expected": 0, "staged": 0}] * (decode_tp - 1)


def test_aborts_at_random_points_leave_nothing_on_any_rank(make_pair, references):
    pair = make_pair(2, 2)
    rng = random.Random(7)
    calls = [pair.call(f"a{i}", p, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
             for i, p in enumerate(prompts() * 2)]
    for call in calls:
        time.sleep(rng.uniform(0, 0.03))
        call.cancel()
    wait_for(pair.idle, "every aborted request's blocks to be freed on both workers", timeout_s=30)
    for engine in pair.engines():
        held = [{k: r[k] for k in ("links", "expected", "staged", "counting")} for r in pair.reports(engine)]
        assert held == [{"links": 1, "expected": 0, "staged": 0, "counting": 0}]
    wait_for(lambda: all(not p.receiver.request_ids and not p.receiver.num_counting
                         for p in pair.decode.peers._peers.values()), "rank 0's link to forget every transfer")
    assert pair.generate("after", prompts()[0]) == references("llama")[0]  # the link still serves


def test_a_decode_rank_killed_fails_its_requests_within_seconds_and_the_group_rejoins(make_pair, references):
    pair = make_pair(1, 2)
    decode = pair.decode.loop.engine
    follower = decode.runner.ranks.procs[0]
    with gated(pair.decode.loop) as release:  # the decode loop runs only the iterations released
        stream = pair.call("long", prompts()[1], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        deltas: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [deltas.put(d) for d in stream], daemon=True).start()
        while deltas.empty():  # until its first token is out: decoding, it holds KV on both ranks
            release(1)
            time.sleep(0.01)
        assert deltas.get().token_ids
        os.kill(follower.pid, signal.SIGKILL)
        follower.join(10)
        killed = time.monotonic()
    while not (last := deltas.get(timeout=10)).finish_reason:
        pass
    assert last.finish_reason == "error" and "rank" in last.error and time.monotonic() - killed < 10
    wait_for(lambda: decode.runner.ranks.num_restarts == 1, "the group to start again")
    assert pair.generate("again", prompts()[2]) == references("llama")[2]  # a new link to the new rank
    assert decode.runner.ranks.procs[0].is_alive() and decode.runner.ranks.procs[0].pid != follower.pid
