"""KV transfer between a prefill engine and a decode engine: the seam.

A prefill engine hands each request's KV to a KVSink one layer at a time, as soon as that
layer's forward has written it: a LayerChunk carries one layer's K and V for a run of the
request's blocks, packed into one buffer. Blocks are named by their index in the request's
block list, not by physical id, so the receiver writes them into whatever blocks it
reserved. A chunked prompt sends each chunk's blocks when the chunk runs; the block it ends
in is sent again, complete, with the next chunk.

Implementations: loopback (same process, tests), gloo (CPU, between
processes) and NCCL (GPU).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LayerChunk:
    request_id: str
    layer: int
    first_block: int  # index into the request's block list
    packed: torch.Tensor  # [2, num_blocks, block_size, num_kv_heads, head_dim]
    last: bool = False  # the prompt's final chunk of the last layer: everything has been sent
    heads: tuple[int, int] | None = None  # receiving side: the run of its KV heads packed holds; None: all
    transfer_id: int = 0  # the receiver's name for the transfer (0: the sender looks it up by request id)

    @property
    def num_blocks(self) -> int:
        return self.packed.shape[1]


class KVSink(ABC):
    @abstractmethod
    def send(self, chunk: LayerChunk) -> None:
        """Ships one chunk; may return before it has arrived (the send overlaps compute)."""

    def blocks_held(self, request_id: str) -> int | None:
        """How many leading blocks of the request the receiver already holds (its prefix
        cache): they are not sent. None: nobody wants this request's KV (it is prefilled
        where it decodes)."""
        return 0

    def transfer(self, request_id: str) -> tuple[int, int] | None:
        """(link number, transfer id) the request's KV travels under, for the other ranks of a
        tensor-parallel prefill worker to send their heads the same way; None: not known."""
        return None
