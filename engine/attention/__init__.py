"""Attention backends behind one interface; `select_backend` picks one for a config."""

from __future__ import annotations

import torch

from engine.attention.base import AttentionBackend, BatchLayout
from engine.attention.torch_ref import TorchAttention

__all__ = ["AttentionBackend", "BatchLayout", "TorchAttention", "select_backend"]


def select_backend(name: str, device: torch.device, block_size: int) -> AttentionBackend:
    if name == "torch" or (name == "auto" and device.type != "cuda"):
        return TorchAttention()
    from engine.attention import flash
    if flash.available():
        return flash.FlashAttention(block_size)
    if name == "flash":
        raise RuntimeError("attention_backend=flash but flash_attn is not importable")
    return TorchAttention()
