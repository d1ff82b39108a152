"""gRPC servicer of one worker (its messages converted by engine/worker/wire.py).

A worker may serve both roles (the pools it belongs to are the scheduler's business). As a
decode worker it answers `Generate` (it owns the request: reserves blocks, asks the prefill
worker named in the request to fill them, or prefills itself when none is named, and
streams every token); as a prefill worker it answers `Connect` (joins the KV link a decode
worker opened, one per pair, replacing the pair's old link after either side restarted) and
`Prefill` (computes the prompt into the caller's blocks over that link, skipping the blocks
the caller has cached, and replies with the first token). Every worker answers `Load` (its
snapshot for the global scheduler) and `Abort`.

A call that ends early (client gone, cancelled, deadline) aborts its request, which frees
its blocks on this side; a decode worker's abort also cancels its Prefill call, which frees
them on the prefill side.
"""

from __future__ import annotations

import itertools
import logging
import queue
from concurrent import futures
from dataclasses import replace
from typing import TYPE_CHECKING

import grpc

from engine.config import WorkerOptions
from engine.errors import RequestError, error_status
from engine.parallel.kv_link import PREFILL, KVLink
from engine.transfer.gloo import GlooSender, join_group
from engine.worker import wire
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop
from engine.worker.prefill_role import PrefillRole
from pdserve_rpc import worker_pb2 as pb
from pdserve_rpc import worker_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from engine.worker.peers import PrefillPeers

log = logging.getLogger(__name__)

_ENDED = object()


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, worker_id: str, incarnation: str, loop: EngineLoop, role: str,
                 decode: DecodeRole | None = None, prefill: PrefillRole | None = None,
                 peers: PrefillPeers | None = None, link_timeout_s: float = WorkerOptions.link_timeout_s, kv_device: str = "cpu"):
        self.worker_id, self.incarnation, self.loop, self.role = worker_id, incarnation, loop, role
        self.decode, self.prefill, self.peers = decode, prefill, peers  # peers: the decode side's prefill peers
        self.link_timeout_s, self.kv_device = link_timeout_s, kv_device  # KV links: gloo on CPU, NCCL on CUDA
        self.senders: dict[str, tuple[GlooSender, int]] = {}  # prefill side: decode worker id -> its KV link, epoch
        self._link_nos = itertools.count(1)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext):
        if self.decode is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.worker_id} is a {self.role} worker")
        rid, prompt = request.request_id, list(request.prompt_token_ids)
        outputs: queue.SimpleQueue = queue.SimpleQueue()
        finished = False

        def ended() -> None:
            if not finished:
                self.decode.abort(rid)
            outputs.put(_ENDED)

        context.add_callback(ended)
        try:
            params = wire.params_from_proto(request.params)
            if request.prefill_worker:
                start = self.peers.starter(request.prefill_worker, request.prefill_address, prompt, params)
                self.decode.generate(rid, prompt, params, start, outputs.put)
            else:
                self.decode.generate_local(rid, prompt, params, outputs.put)
        except RequestError as e:
            context.abort(wire.error_code(e), e.message)
        while True:
            item = outputs.get()
            if item is _ENDED:
                return
            if isinstance(item, Exception):
                finished = True
                yield pb.TokenDelta(request_id=rid, finish_reason="error", error=str(item),
                                    error_status=error_status(item))
                return
            finished = item.finished
            yield wire.output_to_delta(item)
            if finished:
                return

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillReply:
        if self.prefill is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.worker_id} is a {self.role} worker")
        sender, epoch = self.senders.get(request.decode_worker, (None, 0))
        if sender is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no KV link to {request.decode_worker}: Connect first")
        if epoch != self.loop.stats().num_rank_restarts:  # this worker's other ranks started again, linkless
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the KV link to {request.decode_worker} is gone: connect again")
        rid = request.request_id
        try:
            params = wire.params_from_proto(request.params)
            sender.expect(rid, request.transfer_id)
            future = self.prefill.prefill(rid, list(request.prompt_token_ids), params, sender, request.skip_blocks)
        except RequestError as e:
            context.abort(wire.error_code(e), e.message)
        context.add_callback(future.cancel)  # no-op once done; aborts the prefill otherwise
        try:
            out = future.result()
        except futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        except Exception as e:
            context.abort(wire.error_code(e), str(e))
        return wire.first_token_to_reply(out)

    def Connect(self, request: pb.ConnectRequest, context: grpc.ServicerContext) -> pb.ConnectReply:
        if self.prefill is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.worker_id} is a {self.role} worker")
        info = self.loop.engine.info
        link = KVLink(next(self._link_nos), PREFILL, request.host, request.port, info.kv_block_shape[1],
                      info.tensor_parallel_size, request.decode_tp or 1)
        try:
            routes = link.send_routes(0)  # refuses degrees that cannot split the KV heads
            if link.prefill_size > 1:
                self.loop.call(lambda engine: engine.open_kv_link(link)).result(self.link_timeout_s)
        except Exception as e:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"could not open the KV link: {e}")
        # the decode worker hosts the rendezvous once this call returns
        group = join_group(link.host, link.port, 0, link.size, self.link_timeout_s, self.kv_device)
        sender = GlooSender(group, self.kv_device, routes, link.link_no, self.link_timeout_s)
        old, _ = self.senders.get(request.decode_worker, (None, 0))
        self.senders[request.decode_worker] = (sender, self.loop.stats().num_rank_restarts)
        if old is not None:  # the decode worker restarted: its old link is dead
            old.close()
            if link.prefill_size > 1:
                self.loop.call(lambda engine: engine.close_kv_link(old.link_no))
        log.info("%s: KV link to %s (%d to %d ranks)", self.worker_id, request.decode_worker, link.prefill_size,
                 link.decode_size)
        return pb.ConnectReply(prefill_tp=link.prefill_size)

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        found = self.loop.engine.has_request(request.request_id)  # a read from this thread: a hint, not a lock
        (self.decode or self.prefill or self.loop).abort(request.request_id)
        return pb.AbortReply(found=found)

    def Progress(self, request: pb.ProgressRequest, context: grpc.ServicerContext) -> pb.ProgressReply:
        found = self.prefill is not None and self.prefill.owes(request.request_id)
        return pb.ProgressReply(found=found, num_iterations=self.loop.num_iterations)

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.WorkerLoad:
        stats, wait_room = self.loop.stats(), 0
        if self.decode is not None:  # requests queued for KV blocks wait too
            pending = self.decode.num_pending
            stats = replace(stats, num_waiting=stats.num_waiting + pending)
            wait_room = max(0, self.decode.max_pending - pending)
        return wire.stats_to_proto(stats, self.worker_id, self.role, self.incarnation,
                                   self.loop.engine.info.block_size, wait_room)


def start_server(service: pb_grpc.WorkerServicer, host: str, max_workers: int = 512) -> tuple[grpc.Server, int]:
    """Serves on host at a free port (a thread per call: streams block on their outputs)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pdserve-rpc"))
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port

