"""Gloo transport (CPU, between processes): one process group per prefill-decode pair of workers.

`connect_group` builds a ProcessGroupGloo over the ranks of both workers (prefill ranks
0..A-1, then decode ranks A..A+B-1; a pair of single-rank workers is ranks 0 and 1, which
`connect_pair` builds) over a TCPStore the decode worker's first rank hosts on a socket it
listens on itself (`listen`), bound to one address (loopback by default; the store's own
would listen on every interface), so links are created once, independently of any global
process group, and recreated after a restart.

On the wire each LayerChunk is two messages: a header of int64s (transfer id, layer, first
block, number of blocks, last) and the packed KV. The decode side names each request by a
transfer id it handed out when it reserved the blocks; the prefill side maps its request
ids to those (`expect`). A sender sends each chunk to every decode rank it routes to, only the
KV heads that rank holds (engine/parallel/shard.py `kv_routes`). Sends are asynchronous:
`send` only queues the chunk, and a thread of the sender's own puts it on the wire (gloo
writes part of a message on the calling thread, which would otherwise slow the forward), so
the forward continues with the next layer while the previous one travels. A send that failed
(the peer died) makes the next `send` raise. A receiver takes chunks from each of its sources
(`recv_from`), and, on a decode worker's first rank, a header-only `DONE` from each of its
other ranks once they hold a transfer; a chunk says `last` only when it completes the
transfer on this rank. A receive that waits past the timeout raises TransferTimeout.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.transfer.base import KVSink, LayerChunk

log = logging.getLogger(__name__)

PREFILL_RANK, DECODE_RANK = 0, 1
DONE = -1  # the layer field of a header-only message: the sending rank holds the whole transfer
_TAG = 7
_HEADER_LEN = 5

Heads = "tuple[int, int] | None"  # a run of local KV heads (first, end); None: all of them


class TransferTimeout(RuntimeError):
    pass


def listen(host: str) -> tuple[int, int]:
    """(port, file descriptor) of a socket listening on host alone, for the decode rank's store."""
    sock = socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return sock.getsockname()[1], sock.detach()


def connect_group(host: str, port: int, rank: int, size: int, timeout_s: float = 30.0,
                  device: torch.device | str = "cpu", listen_fd: int | None = None) -> dist.ProcessGroup:
    """Blocks until every rank has joined. The rank given listen_fd (from `listen`, which it
    then owns) hosts the store. On a CUDA device the group is a ProcessGroupNCCL
    (engine/transfer/nccl.py), otherwise gloo."""
    timeout = timedelta(seconds=timeout_s)
    is_master = listen_fd is not None
    try:
        store = dist.TCPStore(host, port, world_size=size, is_master=is_master, timeout=timeout,
                              wait_for_workers=False, master_listen_fd=listen_fd)
    except BaseException:
        if listen_fd is not None:
            os.close(listen_fd)
        raise
    if torch.device(device).type == "cuda":
        from engine.transfer.nccl import nccl_group
        return nccl_group(dist.PrefixStore("pdserve-kv", store), rank, size, torch.device(device), timeout)
    options = dist.ProcessGroupGloo._Options()
    options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
    options._timeout = timeout
    return dist.ProcessGroupGloo(dist.PrefixStore("pdserve-kv", store), rank, size, options)


def join_group(host: str, port: int, rank: int, size: int, timeout_s: float = 30.0,
               device: torch.device | str = "cpu") -> Future:
    """`connect_group` (not hosting the store) on a thread of its own: a future of the group,
    or of why it could not be joined (logged)."""
    joined: Future = Future()

    def join() -> None:
        try:
            joined.set_result(connect_group(host, port, rank, size, timeout_s, device))
        except Exception as e:
            log.warning("could not join the KV link at %s:%d as rank %d of %d: %s", host, port, rank, size, e)
            joined.set_exception(e)

    threading.Thread(target=join, name="pdserve-kv-join", daemon=True).start()
    return joined


def connect_pair(host: str, port: int, rank: int, timeout_s: float = 30.0,
                 device: torch.device | str = "cpu", listen_fd: int | None = None) -> dist.ProcessGroup:
    """A single-rank prefill worker (PREFILL_RANK) and a single-rank decode worker
    (DECODE_RANK, which hosts the store on listen_fd)."""
    if rank == DECODE_RANK and listen_fd is None:
        raise ValueError("the decode rank hosts the store: pass listen_fd from listen(host)")
    return connect_group(host, port, rank, 2, timeout_s, device, listen_fd)


class GlooSender(KVSink):
    """routes: (group rank, run of this rank's KV heads) of each decode rank it feeds (default:
    all heads to DECODE_RANK). group may be a future of the group, joined meanwhile."""

    def __init__(self, group: "dist.ProcessGroup | Future", device: torch.device | str = "cpu",
                 routes: list[tuple[int, Heads]] | None = None, link_no: int = 0, join_timeout_s: float = 30.0):
        self.group, self.join_timeout_s = group, join_timeout_s
        self.device = torch.device(device)  # where headers live (NCCL sends CUDA tensors only)
        self.routes = routes if routes is not None else [(DECODE_RANK, None)]
        self.link_no = link_no
        self.transfer_ids: dict[str, int] = {}
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Condition()
        self._num_queued = 0
        self._error: Exception | None = None
        threading.Thread(target=self._pump, name="pdserve-kv-send", daemon=True).start()

    def expect(self, request_id: str, transfer_id: int) -> None:
        self.transfer_ids[request_id] = transfer_id

    def transfer(self, request_id: str) -> tuple[int, int] | None:
        transfer_id = self.transfer_ids.get(request_id)
        return None if transfer_id is None else (self.link_no, transfer_id)

    def send(self, chunk: LayerChunk) -> None:
        if self._error is not None:
            raise RuntimeError(f"the KV link is down: {self._error}")
        transfer_id = chunk.transfer_id or self.transfer_ids[chunk.request_id]
        header = torch.tensor([transfer_id, chunk.layer, chunk.first_block, chunk.num_blocks, int(chunk.last)],
                              dtype=torch.int64, device=self.device)
        if chunk.last:
            self.transfer_ids.pop(chunk.request_id, None)
        messages = []
        for dst, heads in self.routes:
            packed = chunk.packed if heads is None else chunk.packed[:, :, :, heads[0]:heads[1]]
            messages += [(dst, header), (dst, packed.contiguous())]
        self._put(messages)

    def send_done(self, transfer_id: int, dst: int) -> None:
        """Tells rank dst (a decode worker's first rank) that this rank holds the whole transfer."""
        self._put([(dst, torch.tensor([transfer_id, DONE, 0, 0, 1], dtype=torch.int64, device=self.device))])

    def _put(self, messages: list) -> None:
        with self._idle:
            self._num_queued += 1
        self._queue.put(messages)

    def flush(self) -> None:
        """Waits until every queued chunk has been sent (or the link failed)."""
        with self._idle:
            self._idle.wait_for(lambda: self._num_queued == 0)

    def close(self) -> None:
        self._queue.put(None)

    def _pump(self) -> None:
        while (messages := self._queue.get()) is not None:
            if self._error is None:
                try:
                    if isinstance(self.group, Future):
                        self.group = self.group.result(self.join_timeout_s)
                    for dst, tensor in messages:
                        self.group.send([tensor], dst, _TAG).wait()
                except Exception as e:  # the peer is gone: every later send fails fast
                    self._error = e
            with self._idle:
                self._num_queued -= 1
                self._idle.notify_all()


class GlooReceiver:
    """sources: (group rank, run of this rank's KV heads it fills) of each sender (default: the
    prefill rank, all heads); reporters: group ranks that send DONE (a decode worker's other
    ranks, to its first). A transfer completes on this rank once every source and reporter
    has said last."""

    def __init__(self, group: dist.ProcessGroup, block_shape: tuple[int, int, int], dtype: torch.dtype,
                 timeout_s: float = 30.0, device: torch.device | str = "cpu",
                 sources: list[tuple[int, Heads]] | None = None, reporters: list[int] = ()):
        self.group = group
        self.device = torch.device(device)
        self.block_shape = block_shape  # (block_size, num_kv_heads, head_dim) of this rank's cache
        self.dtype = dtype
        self.timeout = timedelta(seconds=timeout_s)
        self.sources = sources if sources is not None else [(PREFILL_RANK, None)]
        self.reporters = list(reporters)
        self.request_ids: dict[int, str] = {}
        self._lasts: dict[int, int] = {}  # by transfer: sources and reporters that said last
        self._lock = threading.Lock()  # the two above: settled on receiving threads, forgotten on others

    def expect(self, transfer_id: int, request_id: str) -> None:
        self.request_ids[transfer_id] = request_id

    @property
    def num_counting(self) -> int:
        """Transfers some sources have finished and others not yet."""
        return len(self._lasts)

    def forget(self, transfer_id: int) -> None:
        """Nobody waits for this transfer any more (its chunks arrive named '')."""
        with self._lock:
            self.request_ids.pop(transfer_id, None)
            self._lasts.pop(transfer_id, None)

    def recv(self) -> LayerChunk:
        """The next chunk from the only source."""
        (src, heads), = self.sources
        return self._settle(self.recv_from(src, heads))

    def recv_from(self, src: int, heads: Heads = None) -> LayerChunk:
        """The next message from group rank src (heads: what its chunks fill), as sent: `last`
        says the source is done, not yet the transfer (`_settle`)."""
        header = torch.empty(_HEADER_LEN, dtype=torch.int64, device=self.device)
        self._wait(self.group.recv([header], src, _TAG))
        transfer_id, layer, first_block, num_blocks, last = header.tolist()
        bs, h, d = self.block_shape
        shape = (2, num_blocks, bs, h if heads is None else heads[1] - heads[0], d)  # DONE: no blocks
        packed = torch.empty(shape, dtype=self.dtype, device=self.device)
        if layer != DONE:
            self._wait(self.group.recv([packed], src, _TAG))
        return LayerChunk("", layer, first_block, packed, bool(last), heads, transfer_id)

    def _settle(self, chunk: LayerChunk) -> LayerChunk:
        """The chunk named by its request ('' when nobody here waits on it), `last` only when it
        completes the transfer on this rank."""
        transfer_id, last = chunk.transfer_id, chunk.last
        with self._lock:
            if last:
                said = self._lasts.pop(transfer_id, 0) + 1
                last = said == len(self.sources) + len(self.reporters)
                if not last:
                    self._lasts[transfer_id] = said
            request_id = self.request_ids.pop(transfer_id, "") if last else self.request_ids.get(transfer_id, "")
        return replace(chunk, request_id=request_id, last=last)

    def serve(self, on_chunk: Callable[[LayerChunk], None], on_error: Callable[[Exception], None],
              name: str = "pdserve-kv-recv") -> None:
        """Receives from every source and reporter on threads of its own, handing each chunk to
        on_chunk in the order it completes (the completing chunk after every other one of its
        transfer); the first error ends them and goes to on_error once."""
        order, failed = threading.Lock(), []

        def run(src: int, heads: Heads) -> None:
            while not failed:
                try:
                    chunk = self.recv_from(src, heads)
                except Exception as e:
                    with order:
                        if not failed:
                            failed.append(e)
                            on_error(e)
                    return
                with order:
                    if not failed:
                        on_chunk(self._settle(chunk))

        for src, heads in [*self.sources, *((r, None) for r in self.reporters)]:
            threading.Thread(target=run, args=(src, heads), name=f"{name}-{src}", daemon=True).start()

    def _wait(self, work) -> None:
        try:
            work.wait(self.timeout)
        except RuntimeError as e:
            raise TransferTimeout(f"no KV arrived within {self.timeout.total_seconds():g} s: {e}") from e
