"""The decode worker's side of its prefill peers: one gRPC channel and one KV link each.

A peer is opened on first use and kept: this worker hosts the gloo rendezvous, asks the
prefill worker to `Connect` to it (each side learns the other's tensor-parallel degree; the
other ranks of either side join the same link, engine/parallel/kv_link.py), and lands every
chunk arriving for this rank (`DecodeRole.land`), once every rank holds the transfer when
there are several. `start()` names the request's transfer id (the decode role's) on that
link, calls `Prefill` and resolves a future with the first token. Cancelling the future (abort,
transfer timeout) cancels the call, which makes the prefill worker drop the request.

A peer that fails (the call is UNAVAILABLE, the link cannot be opened) is dropped; the
request is retried on another prefill worker that `reroute` names (the global scheduler,
told which ones failed), into the same reserved blocks, or fails with a clear error when
there is none. A peer restarted by Ray comes back at a new address: a new peer, a new link;
when this worker's own other ranks started again, every link is opened anew.

`progressing(request_id)` tells the decode role whether a request whose KV is late is still
being worked on: its call is still being placed, or its prefill worker answers a `Progress`
probe within `probe_timeout_s`, still owes the KV and its engine loop has moved since the
last probe. A request queued behind others at a busy prefill worker thus waits as long as
that worker works; a hung one fails it.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from engine.config import WorkerOptions
from engine.errors import EngineError
from engine.outputs import StepOutput
from engine.parallel.kv_link import DECODE, KVLink
from engine.sampling_params import SamplingParams
from engine.transfer.base import LayerChunk
from engine.transfer.gloo import GlooReceiver, connect_group, listen
from engine.worker import wire
from engine.worker.decode_role import DecodeRole, StartPrefill
from pdserve_rpc import worker_pb2 as pb
from pdserve_rpc import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

# (the (id, address) of prefill workers that failed) -> another live one as (id, address), or None
Reroute = Callable[[list[tuple[str, str]]], "tuple[str, str] | None"]
_IDLE_LINK_S = 10 * 365 * 86400.0  # a link waits for chunks as long as it lives; stalls are timed per request


@dataclass(eq=False)
class _Peer:
    worker_id: str
    address: str
    channel: grpc.Channel
    stub: pb_grpc.WorkerStub
    receiver: GlooReceiver
    link_no: int
    epoch: int  # this worker's rank restarts when it was opened
    broken: bool = False


class PeerFailed(RuntimeError):
    pass


class PrefillPeers:
    def __init__(self, decode_worker_id: str, host: str, role: DecodeRole, block_shape: tuple[int, int, int],
                 dtype: torch.dtype, reroute: Reroute, link_timeout_s: float = WorkerOptions.link_timeout_s, max_calls: int = 256,
                 device: torch.device | str = "cpu", probe_timeout_s: float = 5.0, tp_size: int = 1):
        """block_shape: (block_size, the model's KV heads, head_dim); tp_size: this worker's ranks."""
        self.worker_id, self.host, self.role, self.device = decode_worker_id, host, role, device
        self.block_shape, self.dtype, self.reroute, self.tp_size = block_shape, dtype, reroute, tp_size
        self.num_kv_heads = block_shape[1]
        self.link_timeout_s, self.probe_timeout_s = link_timeout_s, probe_timeout_s
        self._active: dict[str, _Peer | None] = {}  # requests whose call runs: the peer it went to
        self._seen: dict[str, int] = {}  # by request: the peer's loop iterations at the last probe
        self._peers: dict[str, _Peer] = {}  # by address
        self._transfers: dict[str, tuple[_Peer, int]] = {}  # by request: the link its KV is awaited on
        self._lock = threading.Lock()
        self._opening: dict[str, threading.Lock] = {}  # by address: held while its link is opened
        self._link_nos = itertools.count(1)
        self._calls = ThreadPoolExecutor(max_calls, thread_name_prefix="pdserve-prefill-call")
        self.num_retries = 0

    def starter(self, prefill_id: str, address: str, prompt_token_ids: list[int],
                params: SamplingParams) -> StartPrefill:
        return lambda request_id, skip_blocks, transfer_id: self.start(
            request_id, prefill_id, address, prompt_token_ids, params, skip_blocks, transfer_id)

    def start(self, request_id: str, prefill_id: str, address: str, prompt_token_ids: list[int],
              params: SamplingParams, skip_blocks: int = 0, transfer_id: int = 0) -> "Future[StepOutput]":
        """skip_blocks: leading blocks cached here, which the prefill worker does not send;
        transfer_id: what the KV travels under (the reservation's)."""
        future: Future = Future()
        self._active[request_id] = None
        try:
            self._calls.submit(self._run, future, request_id, prefill_id, address, prompt_token_ids, params,
                               skip_blocks, transfer_id)
        except RuntimeError:  # closed
            self._active.pop(request_id, None)
            raise
        return future

    def progressing(self, request_id: str) -> bool:
        """Whether the prefill of a request is still under way (see the module's docstring)."""
        if request_id not in self._active:
            return False  # answered (only the KV is awaited) or never started
        peer = self._active.get(request_id)
        if peer is None:
            return True  # the call is being placed: opening a link is bounded on its own
        try:
            reply = peer.stub.Progress(pb.ProgressRequest(request_id=request_id), timeout=self.probe_timeout_s)
        except grpc.RpcError as e:
            log.warning("prefill worker %s did not answer a progress probe for %s (%s)", peer.worker_id,
                        request_id, _brief(e))
            return False
        last = self._seen.get(request_id)
        self._seen[request_id] = reply.num_iterations
        return reply.found and (last is None or reply.num_iterations > last)

    def close(self) -> None:
        self._calls.shutdown(wait=False, cancel_futures=True)
        with self._lock:
            for peer in self._peers.values():
                peer.broken = True
                peer.channel.close()
            self._peers.clear()

    def _run(self, future: Future, request_id: str, prefill_id: str, address: str,
             prompt_token_ids: list[int], params: SamplingParams, skip_blocks: int, transfer_id: int) -> None:
        request = wire.prefill_request(request_id, prompt_token_ids, params, self.worker_id, skip_blocks)
        request.transfer_id = transfer_id
        try:
            self._place(future, request, prefill_id, address)
        finally:
            self._active.pop(request_id, None)
            self._seen.pop(request_id, None)
            if future.cancelled():  # the request ended while its call ran
                self.forget(request_id)

    def _place(self, future: Future, request: pb.PrefillRequest, prefill_id: str, address: str) -> None:
        request_id, failed = request.request_id, []
        while not future.cancelled():
            try:
                reply = self._call(self._peer(prefill_id, address), future, request)
            except (PeerFailed, grpc.RpcError) as e:
                if isinstance(e, grpc.RpcError) and e.code() is not grpc.StatusCode.UNAVAILABLE:
                    if e.code() is not grpc.StatusCode.CANCELLED:
                        _settle(future, error=wire.typed_error(e, "prefill failed"))
                    return
                self._drop(address)
                self._active[request_id] = None  # being placed again: not this peer's to vouch for
                self._seen.pop(request_id, None)
                failed.append((prefill_id, address))
                log.warning("prefill worker %s failed for %s (%s)", prefill_id, request_id, _brief(e))
                try:
                    nxt = self.reroute(failed)
                except Exception as reroute_error:
                    nxt, e = None, reroute_error
                if nxt is None:
                    _settle(future, error=EngineError(f"prefill worker {prefill_id} failed ({_brief(e)}) and no "
                                                      "other prefill worker is available"))
                    return
                prefill_id, address = nxt
                self.num_retries += 1
                continue
            except Exception as e:
                _settle(future, error=EngineError(f"prefill failed: {e}"))
                return
            _settle(future, wire.first_token_from_reply(request_id, reply))
            return

    def _call(self, peer: _Peer, future: Future, request: pb.PrefillRequest) -> pb.PrefillReply:
        peer.receiver.expect(request.transfer_id, request.request_id)
        self._transfers[request.request_id] = (peer, request.transfer_id)
        self._active[request.request_id] = peer
        try:
            call = peer.stub.Prefill.future(request)
        except ValueError as e:  # another request found the peer dead and closed its channel meanwhile
            raise PeerFailed(f"the link to {peer.worker_id} was closed: {e}") from e
        future.add_done_callback(lambda f: call.cancel() if f.cancelled() else None)
        try:
            return call.result()
        except BaseException:  # nobody here waits for this transfer any more: what still arrives is dropped
            self.forget(request.request_id)
            raise

    def forget(self, request_id: str) -> None:
        """The request ended before its KV landed: what still arrives for it is dropped."""
        peer, transfer_id = self._transfers.pop(request_id, (None, 0))
        if peer is not None:
            peer.receiver.forget(transfer_id)

    def _peer(self, worker_id: str, address: str) -> _Peer:
        with self._lock:  # one connect per address at a time; a hung peer holds up no other
            opening = self._opening.setdefault(address, threading.Lock())
        with opening:
            peer = self._peers.get(address)
            epoch = self.role.loop.stats().num_rank_restarts
            if peer is not None and not peer.broken and peer.epoch == epoch:
                return peer
            if peer is not None:  # this worker's other ranks started again: they hold no link
                self._drop(address)
            channel = grpc.insecure_channel(address)
            try:
                peer = self._connect(worker_id, address, channel, epoch)
            except Exception as e:
                channel.close()
                raise PeerFailed(f"could not open a KV link to {worker_id} at {address}: {_brief(e)}") from e
            with self._lock:
                self._peers[address] = peer
        peer.receiver.serve(lambda chunk: self._land(peer, chunk), lambda e: self._closed(peer, e),
                            f"pdserve-kv-{worker_id}")
        return peer

    def _connect(self, worker_id: str, address: str, channel: grpc.Channel, epoch: int) -> _Peer:
        port, listen_fd = listen(self.host)  # this link's rendezvous, on our address only
        try:
            stub = pb_grpc.WorkerStub(channel)
            reply = stub.Connect(pb.ConnectRequest(decode_worker=self.worker_id, host=self.host, port=port,
                                                   decode_tp=self.tp_size), timeout=self.link_timeout_s)
            link = KVLink(next(self._link_nos), DECODE, self.host, port, self.num_kv_heads, reply.prefill_tp or 1,
                          self.tp_size)
            if self.tp_size > 1:
                self.role.loop.call(lambda engine: engine.open_kv_link(link)).result(self.link_timeout_s)
        except BaseException:
            os.close(listen_fd)
            raise
        group = connect_group(self.host, port, link.group_rank(0), link.size, self.link_timeout_s, self.device,
                              listen_fd)
        shape = (self.block_shape[0], link.heads_held(0), self.block_shape[2])
        receiver = GlooReceiver(group, shape, self.dtype, _IDLE_LINK_S, self.device, link.sources(0),
                                link.reporters(0))
        log.info("%s: KV link to %s (%s) up (%d to %d ranks)", self.worker_id, worker_id, address,
                 link.prefill_size, link.decode_size)
        return _Peer(worker_id, address, channel, stub, receiver, link.link_no, epoch)

    def _land(self, peer: _Peer, chunk: LayerChunk) -> None:
        if not chunk.request_id:  # of a transfer nobody awaits: it leaves no count behind
            peer.receiver.forget(chunk.transfer_id)
            return
        if chunk.last:
            self._transfers.pop(chunk.request_id, None)
        if not peer.broken:
            try:
                self.role.land(chunk)
            except EngineError:  # shutting down
                peer.broken = True

    def _closed(self, peer: _Peer, error: Exception) -> None:
        """A receive failed: the peer died or went away; its calls fail on their own."""
        if not peer.broken:
            log.warning("KV link to %s closed: %s", peer.worker_id, _brief(error))
        peer.broken = True

    def _drop(self, address: str) -> None:
        with self._lock:
            peer = self._peers.pop(address, None)
        if peer is not None:
            peer.broken = True
            peer.channel.close()
            if self.tp_size > 1:
                try:
                    self.role.loop.call(lambda engine: engine.close_kv_link(peer.link_no))
                except EngineError:
                    pass  # shutting down


def _settle(future: Future, result: StepOutput | None = None, error: Exception | None = None) -> None:
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:
        pass  # cancelled meanwhile


def _brief(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}: {e.details()}"
    return str(e).splitlines()[0][:200] if str(e) else type(e).__name__
