"""Attention backend interface.

The runner describes a step's packed batch once (`BatchLayout`); the backend turns it
into its own metadata (`prepare`, once per step), then for every layer writes the step's
new K/V into the paged cache and attends (`forward`). All of a layer's writes happen
before any of its reads, so sequences in one step may share blocks being filled.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import torch

from engine.kv.cache import KVLayout


@dataclass
class BatchLayout:
    """A packed varlen batch: sequence i owns tokens [query_start[i], query_start[i+1])."""

    query_start: list[int]
    seq_lens: list[int]
    block_ids: list[list[int]]
    slot_mapping: torch.Tensor
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens)

    def q_len(self, i: int) -> int:
        return self.query_start[i + 1] - self.query_start[i]


class AttentionBackend(abc.ABC):
    name: str
    kv_layout: KVLayout = KVLayout.TOKEN_MAJOR  # the order inside a KV-cache block it reads

    @abc.abstractmethod
    def prepare(self, layout: BatchLayout, device: torch.device) -> Any:
        """Per-step metadata shared by every layer."""

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: Any) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D]; caches as `KVCache.layer` gives them. Returns [T, H, D]."""


def slots_for(block_ids: list[int], start: int, end: int, block_size: int) -> list[int]:
    """Flat cache slots of token positions [start, end) of a sequence holding these blocks."""
    return [block_ids[p // block_size] * block_size + p % block_size for p in range(start, end)]


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slot_mapping, v)
