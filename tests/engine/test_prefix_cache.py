"""Prefix caching: shared prefixes reuse blocks (counted) and change no output."""

import torch

from engine.config import DEFAULT_BLOCK_SIZE as BS
from engine.sampling_params import SamplingParams

from helpers import run_to_end

GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def test_shared_long_prefix_reuses_blocks_with_identical_output(tiny_llama, make_engine):
    g = torch.Generator().manual_seed(3)
    prefix = torch.randint(3, 512, (150,), generator=g).tolist()
    a, b = prefix + [7, 8, 9], prefix + [10, 11]
    cold = make_engine(model=str(tiny_llama), enable_prefix_caching=False)
    expected = run_to_end(cold, [b], GREEDY)["0"]

    engine = make_engine(model=str(tiny_llama))
    run_to_end(engine, [a], GREEDY, ids=["a"])
    hits_before = engine.kv.stats.hit_tokens
    engine.add_request("b", b, GREEDY)
    request = engine.requests["b"][0]
    out = []
    while engine.has_unfinished():
        out += [t for o in engine.step() for t in o.new_token_ids]
    assert out == expected
    assert request.num_cached_tokens == 150 // BS * BS  # the full blocks of the 150-token prefix
    assert engine.kv.stats.hit_tokens - hits_before == 150 // BS * BS


def test_parallel_samples_share_the_prompt_blocks(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama))
    prompt = list(range(3, 3 + 4 * BS + 6))  # 4 full blocks + 6
    engine.add_request("n", prompt, SamplingParams(n=4, temperature=1.0, seed=1, max_tokens=8, ignore_eos=True))
    engine.step()
    children = engine.requests["n"]
    first_blocks = [c.block_ids[:4] for c in children]
    assert all(blocks == first_blocks[0] for blocks in first_blocks)
    assert engine.kv.pool.ref_cnt[first_blocks[0][0]] == 4
    assert engine.kv.num_used_blocks == 4 + 4  # shared prefix + one tail block each
    while engine.has_unfinished():
        engine.step()


def test_the_router_names_blocks_as_the_engine_caches_them(tiny_llama, make_engine):
    """The router predicts which blocks a worker holds from the prompt alone: its names for a
    prompt's full blocks are the KV manager's, for every block but the one with the last token."""
    from engine.kv.prefix_hash import prompt_block_hashes
    engine = make_engine(model=str(tiny_llama))
    prompt = list(range(5, 5 + BS * 3 + 1))  # three full blocks and one token
    run_to_end(engine, [prompt], SamplingParams(temperature=0, max_tokens=1))
    assert len(prompt_block_hashes(prompt, BS)) == 3
    assert all(h in engine.kv.pool.cached for h in prompt_block_hashes(prompt, BS))
