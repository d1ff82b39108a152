"""Greedy token ids equal to HF transformers `generate` (fp32) on the same weights."""

import pytest

from engine.config import DEFAULT_BLOCK_SIZE
from engine.sampling_params import SamplingParams

from helpers import run_to_end
from parity_cases import GREEDY, PROMPT_LENS, prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "llama3", "mistral", "mixtral", "qwen2_moe", "qwen3_moe"])
def test_greedy_matches_hf(arch, tiny_dirs, references, make_engine):
    engine = make_engine(model=str(tiny_dirs[arch]))
    out = run_to_end(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references(arch)


@pytest.mark.parametrize("setting", [
    dict(max_num_batched_tokens=24),              # prompts chunked, decodes interleaved
    dict(num_kv_blocks=640 // DEFAULT_BLOCK_SIZE, max_model_len=256),  # blocks run out: preemption by recompute
    dict(max_num_seqs=2),                         # requests queue for a batch slot
    dict(block_size=8, enable_prefix_caching=False),
])
def test_batching_never_changes_outputs(setting, tiny_llama, references, make_engine):
    engine = make_engine(model=str(tiny_llama), **setting)
    out = run_to_end(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")


def test_preemption_happens_under_a_small_cache(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), num_kv_blocks=640 // DEFAULT_BLOCK_SIZE, max_model_len=256)
    for i, p in enumerate(prompts()):
        engine.add_request(str(i), p, GREEDY)
    requests = [r for children in engine.requests.values() for r in children]
    while engine.has_unfinished():
        engine.step()
    assert sum(r.num_preemptions for r in requests) > 0, "the setting above must exercise preemption"


def test_engine_rejects_bad_requests_without_changing_state(tiny_llama, make_engine):
    from engine.errors import RequestError
    engine = make_engine(model=str(tiny_llama), max_model_len=64)
    for prompt, params in [([], GREEDY), ([1] * 64, GREEDY), ([1, 2], SamplingParams(max_tokens=100)),
                           ([10**6], GREEDY), ([-1], GREEDY)]:
        with pytest.raises(RequestError):
            engine.add_request("bad", prompt, params)
    assert not engine.has_unfinished() and engine.kv.num_used_blocks == 0


def test_kv_cache_must_hold_max_model_len(tiny_llama, make_engine):
    with pytest.raises(ValueError, match="KV cache holds"):
        make_engine(model=str(tiny_llama), num_kv_blocks=4, max_model_len=512)


@pytest.mark.gpu
def test_greedy_matches_hf_on_gpu(tiny_llama, references, make_engine):
    engine = make_engine(model=str(tiny_llama), device="cuda", dtype="float32")
    out = run_to_end(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")
