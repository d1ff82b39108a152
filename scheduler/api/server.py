"""OpenAI-compatible HTTP front door (FastAPI).

Every request is checked in full (body size, model name, body, tokens, sampling values,
context length, sequences per request) before any response starts, so bad input gets a
4xx JSON error and touches no engine state. Tokenisation runs on a small thread pool, never
on the event loop, so a large prompt stalls no other stream and no health check. Streams
are SSE ending in `data: [DONE]` (scheduler/api/responses.py); a client that goes away
cancels its handler, which aborts the request in the engine (blocks freed within one step).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field, replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from engine.errors import EngineError, Overloaded, RequestError, error_status
from engine.sampling_params import SamplingParams
from scheduler.api import formats
from scheduler.api.errors import Unauthorized
from scheduler.api.generation import generate_events, merge
from scheduler.api.limits import BodyLimit, FrontDoorLimits
from scheduler.api.openapi import document_errors
from scheduler.api.protocol import ChatCompletionRequest, CompletionRequest, _Sampling
from scheduler.api.responses import ShuttingDown, bounded, error_response, respond
from scheduler.api.tools import plan_tools, template_messages
from scheduler.api.utility import add_utility_routes, check_model
from scheduler.engine_client import EngineClient
from scheduler.metrics import ServerMetrics
from scheduler.tokenizer import Tokenizer

TIMINGS_HEADER = "x-pdserve-timings"
STREAMS = {200: {"content": {"text/event-stream": {"schema": {  # with "stream": true; each event's data is a JSON chunk
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}}}}}
TEXT_THREADS = 4  # tokenisation and chat templates run here, off the event loop
_text_pool = ThreadPoolExecutor(TEXT_THREADS, thread_name_prefix="pdserve-text")
log = logging.getLogger(__name__)


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    metrics: ServerMetrics | None = None
    limits: FrontDoorLimits = FrontDoorLimits()
    api_key_protects_metrics: bool = False
    max_queued: int | None = None  # requests waiting for their first event, at most (None: the workers bound it)
    closing: asyncio.Event = field(default_factory=asyncio.Event)  # set on shutdown: running requests end
    num_queued: int = 0  # requests admitted here whose first event has not come yet
    strict_fields: bool = False  # an unknown request field is a 400 (else: logged once per name, counted)
    tool_call_parser: str | None = None  # how tool_choice auto finds calls in the model's text
    warned_fields: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.metrics = self.metrics or ServerMetrics()
        self.metrics.vllm.model_name = self.metrics.vllm.model_name or self.model_name

    def close(self) -> None:
        """Ends every running request cleanly (streams: an error event and [DONE]; others:
        a JSON 503) and refuses new ones; on the server's event loop."""
        self.closing.set()


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pd = state
    metrics = state.metrics
    app.add_middleware(BodyLimit, max_bytes=state.limits.max_request_bytes, on_refused=lambda: metrics.reject(413))

    @app.exception_handler(RequestError)
    async def _request_error(_, e: RequestError):
        metrics.reject(e.status_code)
        return error_response(e.status_code, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_, e: RequestValidationError):
        metrics.reject(400)
        first = e.errors()[0] if e.errors() else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        if first.get("type") == "json_invalid":
            return error_response(400, "the request body is not valid JSON")
        return error_response(400, f"{loc or 'body'}: {first.get('msg', 'invalid request')}", loc)

    @app.exception_handler(EngineError)
    async def _engine_error(_, e: EngineError):
        status = error_status(e)
        metrics.reject(status)
        return error_response(status, str(e))

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        metrics.reject(e.status_code)
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug, still answered as JSON and counted (the server logs it)
        metrics.reject(500)
        return error_response(500, f"internal error: {type(e).__name__}")

    expected = f"Bearer {state.api_key}".encode() if state.api_key else None

    # a dependency, not an HTTP middleware: BaseHTTPMiddleware would hide client disconnects
    async def check_api_key(request: Request) -> None:
        if expected is not None and not hmac.compare_digest(request.headers.get("authorization", "").encode(),
                                                            expected):
            raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])
    ops = APIRouter(dependencies=[Depends(check_api_key)] if state.api_key_protects_metrics else [])

    keyed = APIRouter(dependencies=[Depends(check_api_key)])
    add_utility_routes(app.router, keyed, v1, state, _off_loop)

    @ops.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return Response(metrics.render(await state.client.workers(), await state.client.control()),
                        media_type="text/plain; version=0.0.4")

    @ops.get("/openapi.json", include_in_schema=False)
    async def openapi():
        return JSONResponse(app.openapi())

    @v1.get("/models")
    async def models():
        info = state.client.info
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "pdserve", "max_model_len": info.max_model_len}]}

    @v1.post("/completions", responses=STREAMS)
    async def completions(body: CompletionRequest, request: Request):
        _check_body(state, body)
        params = await _with_bad_words(state, body, body.sampling_params())
        texts = body.prompts()
        _check_sequences(state.limits, len(texts), params.n)
        prompts = await _off_loop(lambda: [_tokenize_prompt(state, p) for p in texts])
        await _off_loop(lambda: [state.client.check(ids, params) for ids in prompts])  # a constraint compiles here
        rid = f"cmpl-{uuid.uuid4().hex}"
        events = merge([generate_events(state.client, state.tokenizer, f"{rid}-{i}", ids, params, metrics,
                                        index_base=i * params.n) for i, ids in enumerate(prompts)])
        echo = [(p if isinstance(p, str) else state.tokenizer.decode(ids, skip_special_tokens=False), ids)
                for p, ids in zip(texts, prompts)] if body.echo else None
        shape = formats.CompletionShape(rid, state.model_name, state.tokenizer, len(prompts), params.n,
                                        _wants_timings(request), body.prompt_logprobs is not None, echo=echo,
                                        echo_only=body.echo_only)
        return await _run(state, request, body.stream, body.include_usage, events, shape)

    @v1.post("/chat/completions", responses=STREAMS)
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_body(state, body)
        params = await _with_bad_words(state, body, body.sampling_params())
        _check_sequences(state.limits, 1, params.n)
        tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
        choice = body.tool_choice.model_dump() if hasattr(body.tool_choice, "model_dump") else body.tool_choice
        plan, forced, shown = plan_tools(tools, choice, body.parallel_tool_calls, state.tool_call_parser)
        if forced is not None:
            if params.structured is not None:
                raise RequestError("a forced tool call and an output constraint cannot be combined",
                                   param="tool_choice")
            params = replace(params, structured=forced)
        messages = template_messages([m.as_template_input() for m in body.messages])
        ids = await _off_loop(lambda: state.tokenizer.apply_chat_template(
            messages, body.add_generation_prompt, shown, body.continue_final_message, body.chat_template_kwargs))
        params = _with_room(params, state, ids)
        await _off_loop(lambda: state.client.check(ids, params))  # a constraint compiles here
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        events = generate_events(state.client, state.tokenizer, rid, ids, params, metrics)
        shape = formats.ChatShape(rid, state.model_name, state.tokenizer, 1, params.n, _wants_timings(request),
                                  body.prompt_logprobs is not None, plan=plan)
        return await _run(state, request, body.stream, body.include_usage, events, shape)

    app.include_router(v1)
    app.include_router(keyed)
    app.include_router(ops)
    document_errors(app, v1_auth=expected is not None, ops_auth=expected is not None and state.api_key_protects_metrics)
    return app


async def _off_loop(fn):
    return await asyncio.get_running_loop().run_in_executor(_text_pool, fn)


async def _run(state: ServerState, request: Request, stream: bool, include_usage: bool, events, shape):
    """A request's events through its response: refused when the server closes or its queue
    is full, bounded in time, and holding a place in the queue until its first event."""
    if state.closing.is_set() or (state.max_queued is not None and state.num_queued >= state.max_queued):
        await events.aclose()
        if state.closing.is_set():
            raise ShuttingDown()
        raise Overloaded(f"{state.num_queued} requests are waiting for their first token "
                         f"(--max-queued-requests {state.max_queued}); retry later")
    place = _QueuePlace(state)
    try:
        events = place.until_first(bounded(events, state.limits.stream_idle_timeout_s, state.closing))
        return await respond(request, stream, include_usage, events, shape, state.metrics)
    finally:
        place.leave()  # a request that never started its events holds none either


class _QueuePlace:
    """One request's place among those waiting for their first event (ServerState.num_queued)."""

    def __init__(self, state: ServerState):
        self.state, self.held = state, True
        state.num_queued += 1

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.state.num_queued -= 1

    async def until_first(self, events):
        async with aclosing(events):
            async for event in events:
                self.leave()
                yield event


def _check_body(state: ServerState, body: _Sampling) -> None:
    """The model name, and fields no request model defines: refused, or logged once per name
    and counted."""
    check_model(state, body.model)
    for name in body.unknown_fields():
        if state.strict_fields:
            raise RequestError(f"unknown field {name!r} (this server runs with --strict-fields)", param=name)
        state.metrics.unknown_fields.labels(name[:64]).inc()
        if name not in state.warned_fields and len(state.warned_fields) < MAX_WARNED_FIELDS:
            state.warned_fields.add(name)
            log.warning("request field %r is not one pdserve knows; it is ignored (--strict-fields refuses it)", name)


MAX_WARNED_FIELDS = 256  # distinct unknown field names logged; later ones are only counted


async def _with_bad_words(state: ServerState, body: _Sampling, params: SamplingParams) -> SamplingParams:
    if not body.bad_words:
        return params
    return replace(params, bad_words_ids=await _off_loop(lambda: state.tokenizer.bad_words_ids(body.bad_words)))


def _check_sequences(limits: FrontDoorLimits, num_prompts: int, n: int) -> None:
    if num_prompts > limits.max_prompts_per_request:
        raise RequestError(f"{num_prompts} prompts in one request; at most {limits.max_prompts_per_request} "
                           "(--max-prompts-per-request)", param="prompt")
    if num_prompts * n > limits.max_sequences_per_request:
        raise RequestError(f"{num_prompts} prompts x n={n} is {num_prompts * n} sequences; at most "
                           f"{limits.max_sequences_per_request} per request (--max-sequences-per-request)", param="n")


def _wants_timings(request: Request) -> bool:
    """`x-pdserve-timings: 1` asks for each choice's per-phase seconds in its last chunk."""
    return request.headers.get(TIMINGS_HEADER, "").lower() in ("1", "true", "yes")


def _tokenize_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return state.tokenizer.encode(prompt)
    if not isinstance(prompt, list) or not all(type(t) is int for t in prompt):
        raise RequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")
    return prompt


def _with_room(params: SamplingParams, state: ServerState, ids: list[int]) -> SamplingParams:
    """Chat without max_tokens gets --default-max-tokens, or what is left of the context if less."""
    if params.max_tokens is not None or len(ids) >= state.client.info.max_model_len:
        return params
    return replace(params, max_tokens=min(state.limits.default_max_tokens, state.client.info.max_model_len - len(ids)))
