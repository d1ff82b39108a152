"""Gloo transport (CPU, between processes): one communicator per prefill-decode pair.

`connect_pair` builds a two-rank ProcessGroupGloo (prefill = rank 0, decode = rank 1) over
a TCPStore the decode side hosts on a socket it listens on itself (`listen`), bound to one
address (loopback by default; the store's own would listen on every interface), so pairs
are created once, independently of any global process group, and recreated after a restart.

On the wire each LayerChunk is two messages: a header of int64s (transfer id, layer, first
block, number of blocks, last) and the packed KV. The decode side names each request by a
transfer id it handed out when it reserved the blocks; the prefill side maps its request
ids to those (`expect`). Sends are asynchronous: `send` only queues the chunk, and a thread
of the sender's own puts it on the wire (gloo writes part of a message on the calling
thread, which would otherwise slow the forward), so the forward continues with the next
layer while the previous one travels. A send that failed (the peer died) makes the next
`send` raise. A receive that waits past the timeout raises TransferTimeout.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.transfer.base import KVSink, LayerChunk

PREFILL_RANK, DECODE_RANK = 0, 1
_TAG = 7
_HEADER_LEN = 5


class TransferTimeout(RuntimeError):
    pass


def listen(host: str) -> tuple[int, int]:
    """(port, file descriptor) of a socket listening on host alone, for the decode rank's store."""
    sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return sock.getsockname()[1], sock.detach()


def connect_pair(host: str, port: int, rank: int, timeout_s: float = 30.0,
                 device: torch.device | str = "cpu", listen_fd: int | None = None) -> dist.ProcessGroup:
    """Blocks until both ranks of the pair have joined. The decode rank hosts the store on
    listen_fd (from `listen`, which it then owns). On a CUDA device the pair is a
    ProcessGroupNCCL (engine/transfer/nccl.py), otherwise gloo."""
    timeout = timedelta(seconds=timeout_s)
    is_master = rank == DECODE_RANK
    if is_master and listen_fd is None:
        raise ValueError("the decode rank hosts the store: pass listen_fd from listen(host)")
    try:
        store = dist.TCPStore(host, port, world_size=2, is_master=is_master, timeout=timeout,
                              master_listen_fd=listen_fd if is_master else None)
    except BaseException:
        if listen_fd is not None:
            os.close(listen_fd)
        raise
    if torch.device(device).type == "cuda":
        from engine.transfer.nccl import nccl_pair
        return nccl_pair(dist.PrefixStore("pdserve-kv", store), rank, torch.device(device), timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(dist.PrefixStore("pdserve-kv", store), rank, 2, options)


class GlooSender(KVSink):
    def __init__(self, group: dist.ProcessGroup, device: torch.device | str = "cpu"):
        self.group = group
        self.device = torch.device(device)  # where headers live (NCCL sends CUDA tensors only)
        self.transfer_ids: dict[str, int] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._num_queued = 0
        self._error: Exception | None = None
        threading.Thread(target=self._pump, name="pdserve-kv-send", daemon=True).start()

    def expect(self, request_id: str, transfer_id: int) -> None:
        self.transfer_ids[request_id] = transfer_id

    def send(self, chunk: LayerChunk) -> None:
        if self._error is not None:
            raise RuntimeError(f"the KV link is down: {self._error}")
        header = torch.tensor([self.transfer_ids[chunk.request_id], chunk.layer, chunk.first_block,
                               chunk.num_blocks, int(chunk.last)], dtype=torch.int64, device=self.device)
        if chunk.last:
            self.transfer_ids.pop(chunk.request_id, None)
        with self._idle:
            self._num_queued += 1
        self._queue.put((header, chunk.packed.contiguous()))

    def flush(self) -> None:
        """Waits until every queued chunk has been sent (or the link failed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._num_queued == 0)

    def close(self) -> None:
        self._queue.put(None)

    def _pump(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    for tensor in item:
                        self.group.send([tensor], DECODE_RANK, _TAG).wait()
                except Exception as e:  # the peer is gone: every later send fails fast
                    self._error = e
            with self._idle:
                self._num_queued -= 1
                self._idle.notify_all()


class GlooReceiver:
    def __init__(self, group: dist.ProcessGroup, block_shape: tuple[int, int, int], dtype: torch.dtype,
                 timeout_s: float = 30.0, device: torch.device | str = "cpu"):
        self.group = group
        self.device = torch.device(device)
        self.block_shape = block_shape  # (block_size, num_kv_heads, head_dim)
        self.dtype = dtype
        self.timeout = timedelta(seconds=timeout_s)
        self.request_ids: dict[int, str] = {}

    def expect(self, transfer_id: int, request_id: str) -> None:
        self.request_ids[transfer_id] = request_id

    def recv(self) -> LayerChunk:
        """The next chunk; its request id is the transfer id's, or '' when nobody waits on it."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait(self.group.recv([header], PREFILL_RANK, _TAG))
        transfer_id, layer, first_block, num_blocks, last = header.tolist()
        packed = torch.empty((2, num_blocks, *self.block_shape), dtype=self.dtype, device=self.device)
        self._wait(self.group.recv([packed], PREFILL_RANK, _TAG))
        request_id = self.request_ids.pop(transfer_id, "") if last else self.request_ids.get(transfer_id, "")
        return LayerChunk(request_id, layer, first_block, packed, bool(last))

    def _wait(self, work) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise TransferTimeout(f"no KV arrived within {self.timeout.total_seconds():g} s: {e}") from e
