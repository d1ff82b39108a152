"""Tensor parallelism in our engine on CPU (gloo over loopback): greedy tokens equal to HF's
at 2 and 4 ranks (KV heads split, and replicated), dense, q/k-norm and MoE models; each rank
holds only its shard; a degree that does not divide the model is refused; the ranks stop
with the engine."""

import pytest

from engine.config import EngineConfig
from engine.models.config import ModelConfig
from engine.parallel.shard import Shard, check

from helpers import run_to_end
from parity_cases import GREEDY, PROMPT_LENS, prompts


def cfg(**kw) -> ModelConfig:
    base = dict(architecture="llama", vocab_size=16, hidden_size=64, intermediate_size=128, num_layers=2,
                num_heads=8, num_kv_heads=2, head_dim=8, rms_norm_eps=1e-6, rope_theta=1e4,
                max_position_embeddings=64, tie_word_embeddings=True)
    return ModelConfig(**{**base, **kw})


def test_shards_split_heads_and_replicate_kv_heads_below_the_degree():
    c = cfg()
    two = [Shard(c, r, 2) for r in range(2)]
    assert [(s.first_head, s.num_heads, list(s.kv_heads)) for s in two] == [(0, 4, [0]), (4, 4, [1])]
    four = [Shard(c, r, 4) for r in range(4)]  # 2 KV heads, 4 ranks: each keeps the one its queries read
    assert [list(s.kv_heads) for s in four] == [[0], [0], [1], [1]]
    for s in four:
        group = c.num_heads // c.num_kv_heads
        assert all(h // group in s.kv_heads for h in range(s.first_head, s.first_head + s.num_heads))
    assert four[0].ranks_holding_kv_head(1) == [2, 3]
    assert [list(Shard(c, r, 2).width(128)) [:1] for r in range(2)] == [[0], [64]]


def test_a_degree_that_does_not_divide_the_model_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="8 attention heads"):
        check(cfg(), 3)
    with pytest.raises(ValueError, match="2 KV heads"):
        check(cfg(num_heads=12, num_kv_heads=2), 3)
    check(cfg(), 8)  # KV heads replicated
    with pytest.raises(ValueError, match="not with --tensor-parallel-size"):
        EngineConfig(tensor_parallel_size=2, prefill_schedule="layered")


@pytest.mark.parametrize("arch,size", [("llama", 2), ("qwen3", 2), ("qwen3_moe", 2), ("qwen2_moe", 2), ("llama", 4)])
def test_greedy_matches_hf_across_ranks(arch, size, tiny_dirs, references, make_engine):
    engine = make_engine(model=str(tiny_dirs[arch]), tensor_parallel_size=size)
    out = run_to_end(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references(arch)
    procs = list(engine.runner.ranks.procs)
    assert len(procs) == size - 1 and all(p.is_alive() for p in procs)
    engine.close()
    assert all(p.exitcode == 0 for p in procs)  # each rank stopped when told, holding nothing


def test_each_rank_holds_its_shard_only(tiny_llama, make_engine):
    whole = make_engine(model=str(tiny_llama)).runner
    split = make_engine(model=str(tiny_llama), tensor_parallel_size=2).runner
    assert split.model.layers[0].qkv_proj.weight.shape[0] * 2 == whole.model.layers[0].qkv_proj.weight.shape[0]
    assert split.model.layers[0].down_proj.weight.shape[1] * 2 == whole.model.layers[0].down_proj.weight.shape[1]
    assert split.kv_cache.tensor.numel() * 2 == whole.kv_cache.tensor.numel()


def test_a_rank_killed_fails_its_requests_within_seconds_and_the_group_starts_again(tiny_llama, references):
    import os
    import queue
    import signal
    import time

    from engine.engine import Engine
    from engine.errors import EngineError
    from engine.sampling_params import SamplingParams
    from engine.worker.loop import EngineLoop

    from helpers import assert_no_leak, gated, wait_for
    engine = Engine(EngineConfig(model=str(tiny_llama), tensor_parallel_size=2, num_kv_blocks=128, max_model_len=512))
    loop = EngineLoop(engine).start()
    first = engine.runner.ranks.procs[0]
    try:
        got: queue.Queue = queue.Queue()
        with gated(loop) as release:
            loop.submit("long", list(range(5, 40)), SamplingParams(max_tokens=400, ignore_eos=True, temperature=0), got.put)
            release(1)
            out = got.get(timeout=30)
            assert not isinstance(out, Exception) and out.new_token_ids  # running: its first token is out
            os.kill(first.pid, signal.SIGKILL)
            first.join(10)
            killed = time.monotonic()
        while not isinstance(out := got.get(timeout=10), Exception):
            pass
        assert isinstance(out, EngineError) and time.monotonic() - killed < 10
        wait_for(lambda: engine.kv.num_used_blocks == 0 and not engine.has_unfinished(), "the failed request to be freed")
        # the group starts again at the next step and serves as before
        results: dict[str, list[int]] = {}
        done: queue.Queue = queue.Queue()
        for i, prompt in enumerate(prompts()):
            def sink(o, i=str(i)):
                if isinstance(o, Exception):
                    done.put(o)
                    return
                results.setdefault(i, []).extend(o.new_token_ids)
                if o.finish_reason:
                    done.put(i)
            loop.submit(str(i), prompt, GREEDY, sink)
        finished = [done.get(timeout=60) for _ in PROMPT_LENS]
        assert not [f for f in finished if isinstance(f, Exception)]
        assert [results[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")
        assert engine.runner.ranks.num_restarts == 1 and engine.runner.ranks.procs[0].is_alive()
        assert_no_leak(engine)
    finally:
        procs = list(engine.runner.ranks.procs)
        loop.shutdown()
    assert all(p.exitcode == 0 for p in procs)


def test_serving_colocated_over_two_ranks_matches_one(tiny_llama):
    """`pdserve serve --mode colocated --tensor-parallel-size 2`: the OpenAI server's greedy text
    equals the single-rank engine's; stopping the server stops the ranks."""
    import openai

    from engine import LLM
    from engine.sampling_params import SamplingParams

    from helpers import LiveServer, assert_no_leak
    config = EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256, served_model_name="tiny",
                          tensor_parallel_size=2)
    server = LiveServer(config)
    procs = list(server.engine.runner.ranks.procs)
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        out = client.completions.create(model="tiny", prompt=["The quick brown fox", "Paris is"], max_tokens=12,
                                        temperature=0, extra_body={"ignore_eos": True})
        llm = LLM(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256)
        offline = llm.generate(["The quick brown fox", "Paris is"],
                               SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == [o.text for o in offline]
    finally:
        server.stop()
    assert_no_leak(server.engine)
    assert all(p.exitcode == 0 for p in procs)


def test_serving_refuses_degrees_that_cannot_run_before_starting_anything(tiny_llama):
    from scheduler.cli import serve
    from scheduler.config import ServeConfig

    from helpers import free_port
    model = str(tiny_llama)  # 8 attention heads, 2 KV heads
    with pytest.raises(ValueError, match="--decode-tp 3: tensor-parallel size 3 does not divide this llama model"):
        serve(ServeConfig(mode="disagg", port=free_port(), prefill_tp=2, decode_tp=3), EngineConfig(model=model))
    from engine.models.registry import default_model_path  # a GGUF file: its metadata says 9 heads
    with pytest.raises(ValueError, match="--prefill-tp 2: tensor-parallel size 2 does not divide this llama model: 9 "):
        serve(ServeConfig(mode="disagg", port=free_port(), prefill_tp=2), EngineConfig(model=str(default_model_path())))
    with pytest.raises(ValueError, match="--decode-tp 2: --tensor-parallel-size: pdserve's own engine only"):
        serve(ServeConfig(mode="disagg", port=free_port(), decode_tp=2), EngineConfig(model=model, engine="vllm"))
    with pytest.raises(ValueError, match="--prefill-tp and --decode-tp size disaggregated pools"):
        serve(ServeConfig(mode="colocated", port=free_port(), prefill_tp=2), EngineConfig(model=model))
