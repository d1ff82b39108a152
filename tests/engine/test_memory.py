"""The memory budget decides the packed-GEMM copies and the KV cache left on auto."""

import torch

from engine.kv.cache import KVCache
from engine.memory import AUTO_KV_MAX_BYTES, available_bytes, process_rss


def test_a_tight_budget_keeps_no_copies_and_one_sequence_of_kv(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None,
                         memory_budget="1MiB")  # less than the process holds already
    plan = engine.runner.memory
    assert plan.gemm_buckets == () and engine.num_kv_blocks == 256 // 16  # one sequence, whatever the budget says
    assert engine.runner.model.logits_packed is None


def test_a_roomy_budget_keeps_both_copies_and_caps_the_kv(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None, memory_budget="64GiB")
    assert engine.runner.memory.gemm_buckets == (8, 32)
    cfg = engine.model_config
    per_block = KVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert engine.num_kv_blocks == AUTO_KV_MAX_BYTES // per_block


def test_explicit_values_win_and_auto_reads_the_machine(tiny_llama, make_engine):
    engine = make_engine(model=str(tiny_llama), max_model_len=256, num_kv_blocks=None, memory_budget="1MiB", cpu_gemm_buckets="32",
                         kv_cache_memory="4MiB")
    cfg = engine.model_config
    per_block = KVCache.bytes_per_block(cfg.num_layers, 16, cfg.num_kv_heads, cfg.head_dim, torch.float32)
    assert engine.runner.memory.gemm_buckets == (32,) and engine.num_kv_blocks == (4 << 20) // per_block
    assert 0 < available_bytes() and process_rss() > 0
