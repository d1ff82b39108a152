"""The KV cache: one tensor per device holding every layer's K and V for every block.

Storage [num_layers, 2, num_blocks, block_elements], so one block range of one layer is a
contiguous slice per K/V: exported and imported as a packed buffer (transfer, KV
prediction) and shared across streams or processes as a single allocation. Inside a block
the attention backend picks the order (`KVLayout`): token-major [block_size, kv_heads,
head_dim] for K and V, or head-major with K transposed (K [kv_heads, head_dim, block_size],
V [kv_heads, block_size, head_dim]), the order vLLM's CPU attention kernel reads. Exports
and imports always speak token-major, so a block moves between engines whatever either
stores. On CPU the tensor lives in an anonymous memory map: the kernel hands out zeroed
pages as they are first written, so a large cache costs nothing at start and only the
blocks in use are resident.
"""

from __future__ import annotations

import enum
import math
import mmap
from collections.abc import Sequence

import torch


class KVLayout(enum.StrEnum):
    TOKEN_MAJOR = "token-major"
    HEAD_MAJOR_KT = "head-major-kt"


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device,
                 layout: KVLayout = KVLayout.TOKEN_MAJOR):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layout = layout
        inner = (block_size, num_kv_heads, head_dim) if layout == KVLayout.TOKEN_MAJOR else \
            (num_kv_heads, block_size, head_dim)
        shape = (num_layers, 2, num_blocks, *inner)
        if torch.device(device).type == "cpu":
            itemsize = torch.empty((), dtype=dtype).element_size()
            self._map = mmap.mmap(-1, math.prod(shape) * itemsize)  # zero pages, resident once written
            self.tensor = torch.frombuffer(self._map, dtype=dtype).view(shape)
        else:
            self.tensor = torch.zeros(shape, dtype=dtype, device=device)
        self._layers = [(kv[0], kv[1]) for kv in self.tensor]  # views, made once: every step asks for them

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:
        itemsize = torch.empty((), dtype=dtype).element_size()
        return num_layers * 2 * block_size * num_kv_heads * head_dim * itemsize

    def layer(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of one layer as the attention backend reads them: [num_blocks, block_size,
        num_kv_heads, head_dim] token-major, [num_blocks, num_kv_heads, block_size, head_dim]
        head-major (K's block then holds its [head_dim, block_size] transpose)."""
        return self._layers[layer_idx]

    def export_blocks(self, layer_idx: int, block_ids: Sequence[int]) -> torch.Tensor:
        """Packs one layer's K and V for the given blocks, token-major: [2, len(block_ids), block_size, h, d]."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        packed = self.tensor[layer_idx].index_select(1, index)
        if self.layout == KVLayout.TOKEN_MAJOR:
            return packed
        _, n, h, bs, d = packed.shape
        out = packed.new_empty(2, n, bs, h, d)
        out[0] = packed[0].view(n, h, d, bs).permute(0, 3, 1, 2)
        out[1] = packed[1].transpose(1, 2)
        return out

    def import_blocks(self, layer_idx: int, block_ids: Sequence[int], packed: torch.Tensor,
                      heads: tuple[int, int] | None = None) -> None:
        """Writes a token-major buffer (export_blocks' form) into the given blocks of one layer;
        heads: the run of KV heads it holds (default: all)."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        target = self.tensor[layer_idx]
        if heads is not None:  # token-major [.., block_size, h, d]; head-major [.., h, block_size, d]
            dim = 3 if self.layout == KVLayout.TOKEN_MAJOR else 2
            target = target.narrow(dim, heads[0], heads[1] - heads[0])
        packed = packed.to(self.tensor.dtype)
        if self.layout == KVLayout.HEAD_MAJOR_KT:
            _, n, bs, h, d = packed.shape
            stored = packed.new_empty(2, n, h, bs, d)
            stored[0].view(n, h, d, bs).copy_(packed[0].permute(0, 2, 3, 1))
            stored[1].copy_(packed[1].transpose(1, 2))
            packed = stored
        target.index_copy_(1, index, packed)
