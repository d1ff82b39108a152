"""The KV cache: one tensor per device holding every layer's K and V for every block.

Layout [num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim], so one block range
of one layer is a contiguous slice per K/V: exported and imported as a packed buffer
(transfer, KV prediction) and shared across streams or processes as a single allocation.
On CPU the tensor lives in an anonymous memory map: the kernel hands out zeroed pages as
they are first written, so a large cache costs nothing at start and only the blocks in use
are resident.
"""

from __future__ import annotations

import math
import mmap
from collections.abc import Sequence

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        shape = (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
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
        """K and V of one layer as [num_blocks, block_size, num_kv_heads, head_dim] views."""
        return self._layers[layer_idx]

    def export_blocks(self, layer_idx: int, block_ids: Sequence[int]) -> torch.Tensor:
        """Packs one layer's K and V for the given blocks: [2, len(block_ids), block_size, h, d]."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        return self.tensor[layer_idx].index_select(1, index)

    def import_blocks(self, layer_idx: int, block_ids: Sequence[int], packed: torch.Tensor) -> None:
        """Writes a packed buffer from export_blocks into the given blocks of one layer."""
        index = torch.as_tensor(block_ids, dtype=torch.long, device=self.tensor.device)
        self.tensor[layer_idx].index_copy_(1, index, packed.to(self.tensor.dtype))
