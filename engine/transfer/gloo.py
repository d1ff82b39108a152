"""Gloo transport (CPU, between processes): one communicator per prefill-decode pair.

`connect_pair` builds a two-rank ProcessGroupGloo (prefill = rank 0, decode = rank 1) over
a TCPStore the decode side hosts, bound to one address (loopback by default), so pairs are
created once, independently of any global process group, and recreated after a restart.

On the wire each LayerChunk is two messages: a header of int64s (transfer id, layer, first
block, number of blocks, last) and the packed KV. The decode side names each request by a
transfer id it handed out when it reserved the blocks; the prefill side maps its request
ids to those (`expect`). Sends are asynchronous (the forward continues with the next layer
while the previous one is on the wire); the sender keeps each buffer alive until its send
completes. A receive that waits past the timeout raises TransferTimeout.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist

from engine.transfer.base import KVSink, LayerChunk

PREFILL_RANK, DECODE_RANK = 0, 1
_TAG = 7
_HEADER_LEN = 5


class TransferTimeout(RuntimeError):
    pass


def connect_pair(host: str, port: int, rank: int, timeout_s: float = 30.0) -> dist.ProcessGroupGloo:
    """Blocks until both ranks of the pair have joined (the decode rank hosts the store)."""
    timeout = timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size=2, is_master=rank == DECODE_RANK, timeout=timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(dist.PrefixStore("pdserve-kv", store), rank, 2, options)


class GlooSender(KVSink):
    def __init__(self, group: dist.ProcessGroupGloo):
        self.group = group
        self.transfer_ids: dict[str, int] = {}
        self._in_flight: list[tuple[object, torch.Tensor]] = []

    def expect(self, request_id: str, transfer_id: int) -> None:
        self.transfer_ids[request_id] = transfer_id

    def send(self, chunk: LayerChunk) -> None:
        header = torch.tensor([self.transfer_ids[chunk.request_id], chunk.layer, chunk.first_block,
                               chunk.num_blocks, int(chunk.last)], dtype=torch.int64)
        packed = chunk.packed.contiguous()
        for tensor in (header, packed):  # each buffer stays referenced until its send completes
            self._in_flight.append((self.group.send([tensor], DECODE_RANK, _TAG), tensor))
        if chunk.last:
            self.transfer_ids.pop(chunk.request_id, None)
        self._in_flight = [(w, t) for w, t in self._in_flight if not w.is_completed()]

    def flush(self) -> None:
        """Waits until every send has completed."""
        for work, _ in self._in_flight:
            work.wait()
        self._in_flight = []


class GlooReceiver:
    def __init__(self, group: dist.ProcessGroupGloo, block_shape: tuple[int, int, int], dtype: torch.dtype,
                 timeout_s: float = 30.0):
        self.group = group
        self.block_shape = block_shape  # (block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.timeout = timedelta(seconds=timeout_s)
        self.request_ids: dict[int, str] = {}

    def expect(self, transfer_id: int, request_id: str) -> None:
        self.request_ids[transfer_id] = request_id

    def recv(self) -> LayerChunk:
        """The next chunk; its request id is the transfer id's, or '' when nobody waits on it."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64)
        self._wait(self.group.recv([header], PREFILL_RANK, _TAG))
        transfer_id, layer, first_block, num_blocks, last = header.tolist()
        packed = torch.empty((2, num_blocks, *self.block_shape), dtype=self.dtype)
        self._wait(self.group.recv([packed], PREFILL_RANK, _TAG))
        request_id = self.request_ids.pop(transfer_id, "") if last else self.request_ids.get(transfer_id, "")
        return LayerChunk(request_id, layer, first_block, packed, bool(last))

    def _wait(self, work) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise TransferTimeout(f"no KV arrived within {self.timeout.total_seconds():g} s: {e}") from e
