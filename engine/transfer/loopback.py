"""In-process transport: chunks go straight into a decode engine in the same process (tests;
semi-PD needs no transport: its prefill stream computes into the decode side's blocks). A
chunk for a request the decode engine no longer waits on (aborted) is dropped, as a network
transport would drop it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from engine.transfer.base import KVSink, LayerChunk

if TYPE_CHECKING:
    from engine.interface import WorkerEngine


class LoopbackSink(KVSink):
    def __init__(self, decode: WorkerEngine):
        self.decode = decode
        self.chunks: list[tuple[str, int, int, int]] = []  # (request_id, layer, first_block, num_blocks)

    def send(self, chunk: LayerChunk) -> None:
        self.chunks.append((chunk.request_id, chunk.layer, chunk.first_block, chunk.num_blocks))
        self.decode.receive_kv(chunk)
