"""--engine vllm's configuration, checked before any worker starts (no vLLM import, no torch)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.config import EngineConfig


def test_vllm_engine_args_pass_through_and_unknown_keys_are_named():
    config = EngineConfig(engine="vllm", vllm_engine_args='{"enforce_eager": true, "gpu_memory_utilization": 0.8}')
    from engine.vllm_backend.args import engine_arg_names, engine_args
    assert {"tensor_parallel_size", "quantization", "enforce_eager", "gpu_memory_utilization"} <= engine_arg_names()
    kw = engine_args(config, "/m", on_cpu=True)
    assert kw["enforce_eager"] is True and kw["gpu_memory_utilization"] == 0.8
    assert kw["model"] == "/m" and kw["enable_chunked_prefill"] and kw["distributed_executor_backend"] == "uni"
    assert kw["kv_cache_memory_bytes"] == 1 << 30 and "block_size" not in kw  # vLLM's own default block size
    with pytest.raises(ValueError, match="'enforce_eagre' is not a vLLM engine argument"):
        EngineConfig(engine="vllm", vllm_engine_args='{"enforce_eagre": true}')
    with pytest.raises(ValueError, match="'max_model_len' is set by pdserve; use --max-model-len"):
        EngineConfig(engine="vllm", vllm_engine_args='{"max_model_len": 9}')
    with pytest.raises(ValueError, match="not valid JSON"):
        EngineConfig(engine="vllm", vllm_engine_args="{enforce_eager}")
    with pytest.raises(ValueError, match="needs --engine vllm"):
        EngineConfig(vllm_engine_args='{"enforce_eager": true}')


@pytest.mark.parametrize("field,value,flag", [("prefill_schedule", "layered", "--prefill-schedule layered"),
                                              ("attention_backend", "torch", "--attention-backend"),
                                              ("cpu_weight_packing", "off", "--cpu-weight-packing"),
                                              ("kv_predictor", "/p", "--kv-predictor")])
def test_our_engines_own_options_are_refused_with_vllm(field, value, flag):
    with pytest.raises(ValueError, match=f"{flag}.*pdserve's own engine only"):
        EngineConfig(engine="vllm", **{field: value})


def test_our_engine_keeps_its_block_size_default():
    assert EngineConfig().block_size == 32 and EngineConfig(engine="vllm").block_size is None


def test_semi_pd_with_vllm_is_refused_before_anything_starts():
    r = subprocess.run([sys.executable, "-m", "scheduler.cli", "serve", "--engine", "vllm", "--mode", "semi-pd"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "semi-pd runs pdserve's own engine only" in r.stderr
    r = subprocess.run([sys.executable, "-m", "scheduler.cli", "serve", "--engine", "vllm",
                        "--vllm-engine-args", json.dumps({"no_such": 1})], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "'no_such' is not a vLLM engine argument" in r.stderr
