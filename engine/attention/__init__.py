"""Attention backends behind one interface; `select_backend` picks one for a config."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, BatchLayout
from engine.attention.torch_ref import TorchAttention

__all__ = ["AttentionBackend", "BatchLayout", "TorchAttention", "select_backend"]


def select_backend(name: str, device: torch.device, block_size: int, num_heads: int, num_kv_heads: int,
                   head_dim: int, dtype: torch.dtype) -> AttentionBackend:
    """auto: flash-attn on GPU when importable, vLLM's paged CPU kernel on CPU where it runs
    this model, torch otherwise. A backend asked for by name that cannot run is refused."""
    if name == "cpu" or (name == "auto" and device.type == "cpu"):
        from engine.attention import cpu_paged
        why = cpu_paged.unavailable_reason(device, block_size, head_dim, dtype)
        if why is None:
            return cpu_paged.CpuPagedAttention(num_heads, num_kv_heads, head_dim, dtype)
        if name == "cpu":
            raise ValueError(f"attention_backend=cpu: {why}")
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    from engine.attention import flash
    if flash.available():
        return flash.FlashAttention(block_size)
    if name == "flash":
        raise RuntimeError("attention_backend=flash but flash_attn is not importable")
    return TorchAttention()
