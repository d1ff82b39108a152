"""gRPC servicer of one worker: the only place protobuf meets engine types.

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

import logging
import queue
from concurrent import futures

import grpc

from engine.decode_role import DecodeRole, Overloaded
from engine.engine import StepOutput
from engine.errors import RequestError
from engine.prefill_role import PrefillRole
from engine.request import Timeline, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.transfer.gloo import PREFILL_RANK, GlooSender, connect_pair
from engine.worker import EngineError, EngineWorker
from pdserve_rpc import worker_pb2 as pb
from pdserve_rpc import worker_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

_ENDED = object()
_PHASES = ("queue", "prefill", "transfer", "decode_queue", "decode", "kv_span")


# conversions (both directions, so the client side uses the same ones)

def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    return pb.SamplingParams(n=p.n, max_tokens=p.max_tokens, min_tokens=p.min_tokens, temperature=p.temperature,
                             top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, presence_penalty=p.presence_penalty,
                             frequency_penalty=p.frequency_penalty, repetition_penalty=p.repetition_penalty,
                             seed=p.seed, stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                             logprobs=p.logprobs, kv_prediction=p.kv_prediction)


def params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Raises RequestError for values SamplingParams refuses."""
    opt = lambda name: getattr(m, name) if m.HasField(name) else None  # noqa: E731
    return SamplingParams(n=m.n or 1, max_tokens=opt("max_tokens"), min_tokens=m.min_tokens,
                          temperature=m.temperature, top_p=m.top_p, top_k=m.top_k, min_p=m.min_p,
                          presence_penalty=m.presence_penalty, frequency_penalty=m.frequency_penalty,
                          repetition_penalty=m.repetition_penalty, seed=opt("seed"),
                          stop_token_ids=tuple(m.stop_token_ids), ignore_eos=m.ignore_eos, logprobs=opt("logprobs"),
                          kv_prediction=opt("kv_prediction"))


def logprob_to_proto(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_proto(m: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top])


def timings_to_proto(phases: dict[str, float]) -> pb.Timings:
    fields = {k: v for k, v in phases.items() if k in _PHASES}
    return pb.Timings(**fields, kv_bytes=int(phases["kv_bytes"]) if "kv_bytes" in phases else None)


def timings_from_proto(m: pb.Timings) -> dict[str, float]:
    return {name: float(getattr(m, name)) for name in (*_PHASES, "kv_bytes") if m.HasField(name)}


def output_to_delta(out: StepOutput) -> pb.TokenDelta:
    delta = pb.TokenDelta(request_id=out.request_id, index=out.index, token_ids=out.new_token_ids,
                          logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
                          finish_reason=out.finish_reason or "", num_prompt_tokens=out.num_prompt_tokens,
                          num_cached_tokens=out.num_cached_tokens)
    if out.finished and out.timeline is not None:
        delta.timings.CopyFrom(timings_to_proto(out.timeline.phases()))
    return delta


class RemoteTimeline(Timeline):
    """A timeline whose phases were measured elsewhere (another process's clock)."""

    def __init__(self, phases: dict[str, float]):
        super().__init__(arrival_s=0.0)
        self._phases = phases

    def phases(self, end_s: float | None = None) -> dict[str, float]:
        return dict(self._phases)


def delta_to_output(m: pb.TokenDelta) -> StepOutput:
    timeline = RemoteTimeline(timings_from_proto(m.timings)) if m.HasField("timings") else None
    return StepOutput(m.request_id, m.index, list(m.token_ids), [logprob_from_proto(lp) for lp in m.logprobs],
                      m.finish_reason or None, m.num_prompt_tokens, m.num_cached_tokens, timeline)


def error_code(e: Exception) -> grpc.StatusCode:
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class WorkerService(pb_grpc.WorkerServicer):
    def __init__(self, worker_id: str, incarnation: str, worker: EngineWorker, role: str,
                 decode: DecodeRole | None = None, prefill: PrefillRole | None = None, links=None,
                 link_timeout_s: float = 30.0, kv_device: str = "cpu"):
        self.worker_id, self.incarnation, self.worker, self.role = worker_id, incarnation, worker, role
        self.decode, self.prefill, self.links = decode, prefill, links  # links: PrefillClient (decode)
        self.link_timeout_s, self.kv_device = link_timeout_s, kv_device  # KV links: gloo on CPU, NCCL on CUDA
        self.senders: dict[str, GlooSender] = {}  # prefill side: decode worker id -> its KV link

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
            params = params_from_proto(request.params)
            if request.prefill_worker:
                start = self.links.starter(request.prefill_worker, request.prefill_address, prompt, params)
                self.decode.generate(rid, prompt, params, start, outputs.put)
            else:
                self.decode.generate_local(rid, prompt, params, outputs.put)
        except RequestError as e:
            context.abort(error_code(e), e.message)
        while True:
            item = outputs.get()
            if item is _ENDED:
                return
            if isinstance(item, Exception):
                finished = True
                yield pb.TokenDelta(request_id=rid, finish_reason="error", error=str(item))
                return
            finished = item.finished
            yield output_to_delta(item)
            if finished:
                return

    def Prefill(self, request: pb.PrefillRequest, context: grpc.ServicerContext) -> pb.PrefillReply:
        if self.prefill is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.worker_id} is a {self.role} worker")
        sender = self.senders.get(request.decode_worker)
        if sender is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"no KV link to {request.decode_worker}: Connect first")
        rid = request.request_id
        try:
            params = params_from_proto(request.params)
            sender.expect(rid, request.transfer_id)
            future = self.prefill.prefill(rid, list(request.prompt_token_ids), params, sender, request.skip_blocks)
        except RequestError as e:
            context.abort(error_code(e), e.message)
        context.add_callback(future.cancel)  # no-op once done; aborts the prefill otherwise
        try:
            out = future.result()
        except futures.CancelledError:
            context.abort(grpc.StatusCode.CANCELLED, "cancelled")
        except Exception as e:
            context.abort(error_code(e), str(e))
        phases = out.timeline.phases() if out.timeline else {}
        reply = pb.PrefillReply(first_token_id=out.new_token_ids[0], queue_s=phases.get("queue", 0.0),
                                prefill_s=phases.get("prefill", 0.0))
        if out.new_logprobs:
            reply.first_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
        return reply

    def Connect(self, request: pb.ConnectRequest, context: grpc.ServicerContext) -> pb.ConnectReply:
        if self.prefill is None:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"{self.worker_id} is a {self.role} worker")
        try:
            group = connect_pair(request.host, request.port, PREFILL_RANK, self.link_timeout_s, self.kv_device)
        except Exception as e:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"could not join the KV link: {e}")
        old = self.senders.get(request.decode_worker)
        self.senders[request.decode_worker] = GlooSender(group, self.kv_device)
        if old is not None:  # the decode worker restarted: its old link is dead
            old.close()
        log.info("%s: KV link to %s up", self.worker_id, request.decode_worker)
        return pb.ConnectReply()

    def Abort(self, request: pb.AbortRequest, context: grpc.ServicerContext) -> pb.AbortReply:
        found = request.request_id in self.worker.engine.requests
        (self.decode or self.prefill or self.worker).abort(request.request_id)
        return pb.AbortReply(found=found)

    def Progress(self, request: pb.ProgressRequest, context: grpc.ServicerContext) -> pb.ProgressReply:
        found = self.prefill is not None and self.prefill.owes(request.request_id)
        return pb.ProgressReply(found=found, num_iterations=self.worker.num_iterations)

    def Load(self, request: pb.LoadRequest, context: grpc.ServicerContext) -> pb.WorkerLoad:
        stats = self.worker.stats()
        waiting = stats.num_waiting + (self.decode.num_pending if self.decode else 0)
        return pb.WorkerLoad(worker_id=self.worker_id, role=self.role,
                             pending_prefill_tokens=stats.num_pending_prefill_tokens,
                             num_running=stats.num_running, num_waiting=waiting,
                             num_free_blocks=stats.num_kv_blocks_total - stats.num_kv_blocks_used,
                             num_total_blocks=stats.num_kv_blocks_total,
                             block_size=self.worker.engine.config.block_size, incarnation=self.incarnation,
                             weight_bytes_dense=stats.weight_bytes_dense,
                             weight_bytes_expert=stats.weight_bytes_expert,
                             prefill_s_per_token=stats.prefill_s_per_token,
                             kv_prediction_cost=stats.kv_prediction_cost,
                             num_predicted_prefills=stats.num_predicted_prefills)


def start_server(service: pb_grpc.WorkerServicer, host: str, max_workers: int = 512) -> tuple[grpc.Server, int]:
    """Serves on host at a free port (a thread per call: streams block on their outputs)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="pdserve-rpc"))
    pb_grpc.add_WorkerServicer_to_server(service, server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


def typed_error(e: grpc.RpcError, what: str) -> Exception:
    """The typed error (with its HTTP status) for a failed call."""
    code, details = e.code(), e.details() or str(e.code())
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return RequestError(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(details)
    return EngineError(f"{what}: {details}")
