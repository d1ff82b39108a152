"""Every conversion between protobuf messages and engine types, both directions: the worker's
servicer, its peers, the front door's streams and the scheduler's load polls all use these.
Torch-free. Fields that carry the same thing have the same name on both sides, so most
conversions go field by field instead of listing them.
"""

from __future__ import annotations

from dataclasses import asdict, fields

import grpc

from engine.errors import EngineError, Overloaded, RequestError
from engine.outputs import EngineStats, RemoteTimeline, StepOutput, TokenLogprobs
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredOutput
from pdserve_rpc import worker_pb2 as pb

_PHASES = ("queue", "prefill", "transfer", "decode_queue", "decode", "kv_span")
_PARAMS_ON_WIRE = tuple(f.name for f in fields(SamplingParams) if f.name in pb.SamplingParams.DESCRIPTOR.fields_by_name)
_OPTIONAL = {f.name for f in pb.SamplingParams.DESCRIPTOR.fields if f.has_presence}
_STATS = tuple(f.name for f in fields(EngineStats))


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    """Stop strings and detokenization settings stay with the front door; the rest travels."""
    values = {name: getattr(p, name) for name in _PARAMS_ON_WIRE}
    values["stop_token_ids"] = list(p.stop_token_ids)
    values["logit_bias"] = dict(p.logit_bias)
    values["allowed_token_ids"] = list(p.allowed_token_ids)
    values["bad_words_ids"] = [pb.TokenSequence(token_ids=w) for w in p.bad_words_ids]
    if p.structured is not None:
        values["structured"] = pb.StructuredOutput(kind=p.structured.kind.value, spec=p.structured.spec)
    return pb.SamplingParams(**{k: v for k, v in values.items() if v is not None})


def params_from_proto(m: pb.SamplingParams) -> SamplingParams:
    """Raises RequestError for values SamplingParams refuses."""
    values = {name: getattr(m, name) if name not in _OPTIONAL or m.HasField(name) else None
              for name in _PARAMS_ON_WIRE}
    values["n"] = m.n or 1
    values["stop_token_ids"] = tuple(m.stop_token_ids)
    values["logit_bias"] = tuple(m.logit_bias.items())
    values["allowed_token_ids"] = tuple(m.allowed_token_ids)
    values["bad_words_ids"] = tuple(tuple(w.token_ids) for w in m.bad_words_ids)
    values["structured"] = StructuredOutput(m.structured.kind, m.structured.spec) if m.HasField("structured") else None
    return SamplingParams(**values)


def generate_request(request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                     prefill_worker: str = "", prefill_address: str = "") -> pb.GenerateRequest:
    """A request for a decode worker; no prefill worker named: it prefills the prompt itself."""
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_proto(params),
                              prefill_worker=prefill_worker, prefill_address=prefill_address)


def prefill_request(request_id: str, prompt_token_ids: list[int], params: SamplingParams, decode_worker: str,
                    skip_blocks: int = 0) -> pb.PrefillRequest:
    """A prompt for a prefill worker to compute into decode_worker's blocks, but the first
    skip_blocks (cached there)."""
    return pb.PrefillRequest(request_id=request_id, prompt_token_ids=prompt_token_ids, params=params_to_proto(params),
                             decode_worker=decode_worker, skip_blocks=skip_blocks)


def logprob_to_proto(lp: TokenLogprobs) -> pb.TokenLogprob:
    return pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def logprob_from_proto(m: pb.TokenLogprob) -> TokenLogprobs:
    return TokenLogprobs(m.token_id, m.logprob, [(t.token_id, t.logprob) for t in m.top])


def timings_to_proto(phases: dict[str, float]) -> pb.Timings:
    values = {k: v for k, v in phases.items() if k in _PHASES}
    return pb.Timings(**values, kv_bytes=int(phases["kv_bytes"]) if "kv_bytes" in phases else None)


def timings_from_proto(m: pb.Timings) -> dict[str, float]:
    return {name: float(getattr(m, name)) for name in (*_PHASES, "kv_bytes") if m.HasField(name)}


def output_to_delta(out: StepOutput) -> pb.TokenDelta:
    delta = pb.TokenDelta(request_id=out.request_id, index=out.index, token_ids=out.new_token_ids,
                          logprobs=[logprob_to_proto(lp) for lp in out.new_logprobs],
                          finish_reason=out.finish_reason or "", num_prompt_tokens=out.num_prompt_tokens,
                          num_cached_tokens=out.num_cached_tokens)
    if out.finished and out.timeline is not None:
        delta.timings.CopyFrom(timings_to_proto(out.timeline.phases()))
    if out.prompt_logprobs is not None:
        delta.has_prompt_logprobs = True
        delta.prompt_logprobs.extend(logprob_to_proto(lp) for lp in out.prompt_logprobs[1:])
    return delta


def delta_to_output(m: pb.TokenDelta) -> StepOutput:
    timeline = RemoteTimeline(timings_from_proto(m.timings)) if m.HasField("timings") else None
    prompt = [None, *(logprob_from_proto(lp) for lp in m.prompt_logprobs)] if m.has_prompt_logprobs else None
    return StepOutput(m.request_id, m.index, list(m.token_ids), [logprob_from_proto(lp) for lp in m.logprobs],
                      m.finish_reason or None, m.num_prompt_tokens, m.num_cached_tokens, timeline,
                      prompt_logprobs=prompt)


def first_token_to_reply(out: StepOutput) -> pb.PrefillReply:
    phases = out.timeline.phases() if out.timeline else {}
    reply = pb.PrefillReply(first_token_id=out.new_token_ids[0], queue_s=phases.get("queue", 0.0),
                            prefill_s=phases.get("prefill", 0.0))
    if out.new_logprobs:
        reply.first_logprob.CopyFrom(logprob_to_proto(out.new_logprobs[0]))
    return reply


def first_token_from_reply(request_id: str, m: pb.PrefillReply) -> StepOutput:
    logprobs = [logprob_from_proto(m.first_logprob)] if m.HasField("first_logprob") else []
    return StepOutput(request_id, 0, [m.first_token_id], logprobs,
                      timeline=RemoteTimeline({"queue": m.queue_s, "prefill": m.prefill_s}))


def stats_to_proto(stats: EngineStats, worker_id: str, role: str, incarnation: str,
                   block_size: int, wait_room: int = 0) -> pb.WorkerLoad:
    return pb.WorkerLoad(worker_id=worker_id, role=role, incarnation=incarnation, block_size=block_size,
                         wait_room=wait_room, **asdict(stats))


def stats_from_proto(m: pb.WorkerLoad) -> EngineStats:
    return EngineStats(**{name: getattr(m, name) for name in _STATS})


def error_code(e: Exception) -> grpc.StatusCode:
    if isinstance(e, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(e, RequestError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def typed_error(e: grpc.RpcError, what: str) -> Exception:
    """The typed error (with its HTTP status) for a failed call."""
    code, details = e.code(), e.details() or str(e.code())
    if code is grpc.StatusCode.INVALID_ARGUMENT:
        return RequestError(details)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Overloaded(details)
    return EngineError(f"{what}: {details}")
