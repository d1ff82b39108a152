"""bfloat16 against HF transformers' own bfloat16 forward on the same weights, and which dtype
`--dtype auto` picks.

Two bfloat16 computations that round in different places (fused QKV and gate/up matmuls,
fused RMSNorm, the order of a dot product's sums) cannot promise the same greedy tokens: where
two tokens' logits lie within a rounding of each other, either may win. So each prompt's
greedy output must equal HF's, or part from it only at such a tie: at the first differing
token, HF's float32 logits for the two tokens lie closer together than twice the distance
of HF's own bfloat16 logits there from its float32 ones (two roundings, each about that
large; a wrong rotary, residual or cache read parts by more, and sooner).
"""

import pytest
import torch

from helpers import divergences_beyond_ties, hf_greedy, run_to_end
from parity_cases import GREEDY, NUM_TOKENS, PROMPT_LENS, prompts


@pytest.mark.parametrize("arch", ["llama", "qwen3", "qwen2", "mixtral"])
def test_bfloat16_greedy_matches_hf_in_bfloat16_up_to_ties(arch, tiny_dirs, make_engine):
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.bfloat16)
    expected = hf_greedy(hf, prompts(), NUM_TOKENS)
    engine = make_engine(model=str(tiny_dirs[arch]), dtype="bfloat16")
    assert engine.runner.kv_cache.tensor.dtype == torch.bfloat16
    out = run_to_end(engine, prompts(), GREEDY)
    got = [out[str(i)] for i in range(len(PROMPT_LENS))]
    reference = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
    assert divergences_beyond_ties(reference, hf, prompts(), got, expected) == []


def test_auto_dtype_is_bfloat16_only_where_the_cpu_has_bfloat16_instructions(monkeypatch):
    from engine import runner
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert runner.resolve_dtype("auto", cpu) == torch.float32
    assert runner.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
    monkeypatch.setattr(runner.packed_gemm, "available", lambda device, dtype: True)
    assert runner.resolve_dtype("auto", cpu) == torch.bfloat16
    assert runner.resolve_dtype("float32", cpu) == torch.float32
    assert runner.resolve_dtype("auto", torch.device("cuda")) == torch.bfloat16
