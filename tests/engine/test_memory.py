"""The memory budget decides the packed weights and the KV cache left on auto."""

import pytest
import torch

from engine.kv.cache import KVCache
from engine.memory import AUTO_KV_MAX_BYTES, available_bytes, process_rss
from engine.models import packed_gemm

needs_packing = pytest.mark.skipif(not packed_gemm.available(torch.device("cpu"), torch.float32),
                                   reason="oneDNN runs no packed fp32 matmul here")


def test_a_tight_budget_keeps_no_packed_copy_and_one_sequence_of_kv(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None,
                         memory_budget="1MiB")  # less than the process holds already
    plan = engine.runner.memory
    assert not plan.packed_weights and engine.num_kv_blocks == 256 // engine.runner.block_size  # one sequence, whatever the budget says
    assert engine.runner.model.logits_packed is None


@needs_packing
def test_a_roomy_budget_packs_the_weights_and_caps_the_kv(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None, memory_budget="64GiB")
    assert engine.runner.memory.packed_weights and engine.runner.model.logits_packed is not None
    cfg = engine.model_config
    per_block = KVCache.bytes_per_block(cfg.num_layers, engine.runner.block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert engine.num_kv_blocks == AUTO_KV_MAX_BYTES // per_block


@needs_packing
def test_explicit_values_win_and_auto_reads_the_machine(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None, memory_budget="1MiB",
                         cpu_weight_packing="on", kv_cache_memory="4MiB")
    cfg = engine.model_config
    per_block = KVCache.bytes_per_block(cfg.num_layers, engine.runner.block_size, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert engine.runner.memory.packed_weights and engine.num_kv_blocks == (4 << 20) // per_block
    assert not make_engine(model=str(tiny_llama), max_model_len=256, cpu_weight_packing="off").runner.memory.packed_weights
    assert 0 < available_bytes() and process_rss() > 0


@pytest.mark.skipif(packed_gemm.available(torch.device("cpu"), torch.bfloat16), reason="this CPU packs bfloat16")
def test_packing_asked_for_where_onednn_cannot_run_the_dtype_is_refused(tiny_llama):
    from engine.config import EngineConfig
    from engine.engine import Engine
    with pytest.raises(ValueError, match="--cpu-weight-packing on: oneDNN cannot run torch.bfloat16"):
        Engine(EngineConfig(model=str(tiny_llama), max_model_len=256, num_kv_blocks=64, dtype="bfloat16",
                            cpu_weight_packing="on"))
