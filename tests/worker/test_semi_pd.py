"""Semi-PD: prefill and decode as two threads over one KV pool give HF's greedy tokens under
every prefill schedule, dense and MoE; the decode side owns the blocks; aborts, failures and
shutdown leave nothing behind."""

import queue
import threading
import time

import pytest
import torch

from engine import batcher as batcher_mod
from engine.config import DEFAULT_BLOCK_SIZE, EngineConfig
from engine.errors import RequestError
from engine.models import packed_gemm
from engine.sampling_params import SamplingParams
from engine.split import ComputeSplit
from engine.worker.semi_pd import SemiPD
from engine.worker.split_controller import SplitControllerConfig

from helpers import stalled, wait_for
from parity_cases import GREEDY, PROMPT_LENS, prompts

SMALL_GROUPS = ((16, 1), (64, 2), (128, 3))
TIMEOUT_S = 120


def make_worker(model, **kw) -> SemiPD:
    kw.setdefault("num_kv_blocks", 128)
    kw.setdefault("max_model_len", 512)
    return SemiPD(EngineConfig(model=str(model), num_threads=2, **kw)).start()


def assert_no_leak(worker: SemiPD) -> None:
    """Every block back in the pool (the prefill stream's references given back on the decode
    thread), no request left on either side, both threads stopped."""
    engine = worker.engine
    wait_for(lambda: engine.kv.num_used_blocks == 0 and not engine.has_unfinished()
             and not worker.prefill_engine.has_unfinished(), "every block and request to be released")
    assert all(c == 0 for c in engine.kv.pool.ref_cnt) and worker.lent.num_used_blocks == 0
    assert not engine.runner.sampler._generators and not worker.prefill_engine.runner.sampler._generators
    assert not worker._children and not worker.role.num_pending and not worker.role.num_deadlines
    worker.shutdown()
    assert not worker.decode._thread.is_alive() and not worker.prefill._thread.is_alive()


def generate(worker, prompt_list, params, every_s: float = 0.0) -> dict[str, list[int]]:
    """Submits every prompt (one each every_s seconds); returns the tokens of sample 0 by id."""
    done: queue.Queue = queue.Queue()
    out = {str(i): [] for i in range(len(prompt_list))}
    for i, p in enumerate(prompt_list):
        def sink(o, rid=str(i)):
            if isinstance(o, Exception):
                done.put((rid, o))
                return
            if o.index == 0:
                out[rid].extend(o.new_token_ids)
            if o.finished:
                done.put((rid, o.index))
        worker.submit(str(i), p, params, sink)
        time.sleep(every_s)
    ends = [done.get(timeout=TIMEOUT_S) for _ in range(len(prompt_list) * params.n)]
    errors = [e for _, e in ends if isinstance(e, Exception)]
    assert not errors, errors
    return out


@pytest.mark.parametrize("setting", [
    dict(prefill_schedule="whole"),
    dict(prefill_schedule="chunked", token_budget=24),
    dict(prefill_schedule="layered"),
    dict(prefill_schedule="chunked", num_kv_blocks=640 // DEFAULT_BLOCK_SIZE, max_model_len=256),  # decode-side preemption
])
@pytest.mark.parametrize("every_s", [0.0, 0.05])
def test_semi_pd_matches_hf(setting, every_s, tiny_llama, references, monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    worker = make_worker(tiny_llama, **setting)
    model = worker.engine.runner.model
    if worker.engine.runner.memory.packed_weights:  # both streams run the matmuls: the thread-safe op
        packs = [m.packed for m in model.modules() if hasattr(m, "packed")] + [model.logits_packed]
        assert packs and all(isinstance(p, packed_gemm.PackedWeight) for p in packs)
    out = generate(worker, prompts(), GREEDY, every_s)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")
    assert_no_leak(worker)


@pytest.mark.parametrize("schedule", ["whole", "chunked", "layered"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_semi_pd_moe_matches_hf(arch, schedule, tiny_dirs, references, monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    worker = make_worker(tiny_dirs[arch], prefill_schedule=schedule, token_budget=32)
    out = generate(worker, prompts(), GREEDY, 0.02)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references(arch)
    assert worker.stats().weight_bytes_expert > 0
    assert_no_leak(worker)


@pytest.mark.parametrize("arch,setting", [("llama", dict(prefill_schedule="whole")),
                                          ("qwen3_moe", dict(prefill_schedule="chunked", token_budget=24))])
def test_semi_pd_over_two_ranks_matches_hf(arch, setting, tiny_dirs, references):
    """--mode semi-pd --tensor-parallel-size 2: each rank runs both streams (a group each) over
    its shard; the other rank stops with the worker."""
    worker = make_worker(tiny_dirs[arch], tensor_parallel_size=2, **setting)
    procs = list(worker.engine.runner.ranks.procs)
    assert worker.prefill_engine.runner.tp is worker.engine.runner.ranks.groups[1]
    out = generate(worker, prompts(), GREEDY, 0.02)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references(arch)
    assert_no_leak(worker)
    assert [p.exitcode for p in procs] == [0]


def test_prefix_hits_and_n_samples(tiny_llama, references):
    """A repeated prompt reuses the decode side's cached blocks (the prefill stream skips
    them); n=2 greedy gives two identical samples."""
    worker = make_worker(tiny_llama)
    long_prompt = prompts()[-1]
    generate(worker, [long_prompt], GREEDY)
    hits = worker.engine.kv.stats.hit_tokens
    out = generate(worker, [long_prompt], SamplingParams(temperature=0, max_tokens=32, min_tokens=32, n=2))
    assert worker.engine.kv.stats.hit_tokens - hits >= 192 and out["0"] == references("llama")[-1]
    assert_no_leak(worker)


def test_abort_mid_prefill_keeps_blocks_until_the_prefill_stream_lets_go(tiny_llama, references):
    worker = make_worker(tiny_llama, enable_prefix_caching=False)
    gate = threading.Event()
    worker.prefill.call(lambda _: gate.wait(TIMEOUT_S))  # the prefill thread is busy (a long step)
    ended: queue.Queue = queue.Queue()
    worker.submit("a", prompts()[-1], GREEDY, ended.put)
    wait_for(lambda: worker.lent.num_used_blocks == -(-200 // DEFAULT_BLOCK_SIZE), "the prompt's blocks to be lent")
    blocks = list(worker.lent._loans["a"].block_ids)
    worker.abort("a")
    wait_for(lambda: not worker.engine.has_unfinished(), "the decode side to end the request")
    assert all(worker.engine.kv.pool.ref_cnt[b] == 1 for b in blocks)  # still the prefill stream's
    gate.set()
    wait_for(lambda: all(worker.engine.kv.pool.ref_cnt[b] == 0 for b in blocks), "the prefill stream to let go")
    out = generate(worker, prompts()[:3], GREEDY)
    assert [out[str(i)] for i in range(3)] == references("llama")[:3]
    assert ended.empty()  # an aborted request's sink hears nothing more
    assert_no_leak(worker)


def test_bad_request_and_overload_change_nothing(tiny_llama):
    worker = make_worker(tiny_llama, max_model_len=64)
    with pytest.raises(RequestError):
        worker.submit("x", list(range(3, 80)), GREEDY, lambda o: None)
    with pytest.raises(RequestError):
        worker.submit("y", [10**6], GREEDY, lambda o: None)
    assert worker.stats().num_waiting == 0
    assert_no_leak(worker)


def test_shutdown_fails_what_runs_and_stops_both_threads(tiny_llama):
    worker = make_worker(tiny_llama)
    ended: queue.Queue = queue.Queue()
    worker.submit("a", prompts()[-1], SamplingParams(temperature=0, max_tokens=300, ignore_eos=True), ended.put)
    wait_for(lambda: worker.engine.batcher.running, "the request to decode")
    worker.shutdown()
    item = ended.get(timeout=5)
    while not isinstance(item, Exception):
        assert not item.finished
        item = ended.get(timeout=5)
    assert not worker.decode._thread.is_alive() and not worker.prefill._thread.is_alive()


def test_cpu_split_maps_shares_to_thread_counts():
    split = ComputeSplit(torch.device("cpu"), 25, num_cores=8)
    assert (split.threads("prefill"), split.threads("decode")) == (2, 6)
    split.set_share(90)
    assert (split.threads("prefill"), split.threads("decode")) == (7, 1)  # decode keeps a core
    split.set_share(1)
    assert (split.threads("prefill"), split.threads("decode")) == (1, 7)
    two = ComputeSplit(torch.device("cpu"), 80, num_cores=2)
    assert (two.threads("prefill"), two.threads("decode")) == (1, 1)
    for bad in (0, 100, -5):
        with pytest.raises(ValueError):
            split.set_share(bad)
    assert split.prefill_share == 1


@pytest.mark.gpu
def test_semi_pd_on_gpu_matches_colocated(tiny_llama, references):
    """Green contexts (or stream priorities) on CUDA: the same tokens as HF."""
    worker = make_worker(tiny_llama, device="cuda", dtype="float32", attention_backend="torch")
    assert worker.split.mechanism in ("green-contexts", "stream-priority")
    out = generate(worker, prompts(), GREEDY, 0.01)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")
    assert_no_leak(worker)


def test_serving_semi_pd_over_http(tiny_llama):
    """`--mode semi-pd` behind the OpenAI server: greedy equals the offline engine, n > 1, a
    client gone mid-stream frees its blocks, and /metrics shows the split and weight bytes."""
    import httpx
    import openai

    from engine import LLM
    from scheduler.config import ServeConfig

    from helpers import LiveServer
    config = EngineConfig(model=str(tiny_llama), num_kv_blocks=128, max_model_len=256, served_model_name="tiny")
    server = LiveServer(config, serve_config=ServeConfig(mode="semi-pd", semi_pd=SplitControllerConfig(window=3), semi_pd_prefill_share=30))
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        greedy = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
        out = client.completions.create(model="tiny", prompt="The quick brown fox", **greedy)
        llm = LLM(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256)
        offline = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert out.choices[0].text == offline[0].text
        batch = client.completions.create(model="tiny", prompt=["Paris is", "def f"], max_tokens=4, n=2,
                                          temperature=0.8, seed=1)
        assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
        body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert any(next(lines).startswith("data: ") for _ in range(6))
        wait_for(lambda: server.engine.kv.num_used_blocks == 0, "a disconnected stream's blocks to be freed")
        text = httpx.get(server.url + "/metrics").text
        assert 'pdserve_semi_pd_share_percent{phase="prefill"} 30.0' in text
        assert 'pdserve_semi_pd_share_percent{phase="decode"} 70.0' in text
        assert 'pdserve_worker_up{pool="semi-pd",worker="semi-pd-0"} 1.0' in text
        assert 'pdserve_controller_verdict{verdict="few-samples"} 1.0' in text
        dense = [line for line in text.splitlines() if line.startswith("pdserve_worker_weight_bytes_read")
                 and 'kind="dense"' in line]
        assert dense and float(dense[0].split()[-1]) > 0
    finally:
        server.stop()
    assert_no_leak(server.loop)


def test_the_wait_for_blocks_follows_its_flag(tiny_llama):
    """--max-waiting-for-blocks bounds semi-PD's queue for KV blocks as it does a decode
    worker's: of six 200-token prompts with room for two, three wait and one is refused."""
    from engine.config import WorkerOptions
    from scheduler.cli import build_server
    from scheduler.config import ServeConfig
    config = EngineConfig(model=str(tiny_llama), num_kv_blocks=2 * -(-202 // DEFAULT_BLOCK_SIZE), max_model_len=256,
                          num_threads=2)
    _, semi = build_server(config, ServeConfig(mode="semi-pd", worker=WorkerOptions(max_waiting_for_blocks=3)))
    ended: queue.Queue = queue.Queue()
    try:
        with stalled(semi.decode):  # all six arrive before the first try
            for i in range(6):
                semi.submit(str(i), list(range(3 + i, 203 + i)), SamplingParams(max_tokens=2), ended.put)
        outcomes = []
        while len(outcomes) < 6:
            out = ended.get(timeout=TIMEOUT_S)
            if isinstance(out, Exception) or out.finished:
                outcomes.append(type(out).__name__)
        assert sorted(outcomes) == ["Overloaded"] + ["StepOutput"] * 5
    finally:
        assert_no_leak(semi)
