"""OpenAI-compatible HTTP front door (FastAPI).

Every request is checked in full (model name, body, tokens, sampling values, context
length) before any response starts, so bad input gets a 4xx JSON error and touches no
engine state. Streams are SSE ending in `data: [DONE]`; a client that goes away cancels
its handler, which aborts the request in the engine (blocks freed within one step).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, replace

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from engine.errors import EngineError, RequestError
from engine.sampling_params import SamplingParams
from scheduler.api import formats
from scheduler.api.errors import ModelNotFound, Unauthorized
from scheduler.api.generation import ChoiceEvent, generate_events, merge
from scheduler.api.protocol import ChatCompletionRequest, CompletionRequest
from scheduler.engine_client import EngineClient
from scheduler.metrics import ServerMetrics
from scheduler.tokenizer import Tokenizer

TIMINGS_HEADER = "x-pdserve-timings"
RETRY_AFTER_S = "1"  # what a 503 (no worker has room now) asks clients to wait


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: Tokenizer
    model_name: str
    api_key: str | None = None
    metrics: ServerMetrics | None = None

    def __post_init__(self) -> None:
        self.metrics = self.metrics or ServerMetrics()


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error"}.get(
        status, "invalid_request_error" if status < 500 else "internal_server_error")
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code or status}},
                        status_code=status, headers=headers)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="pdserve", docs_url=None, redoc_url=None)
    app.state.pd = state
    metrics = state.metrics

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
        metrics.reject(500)
        return error_response(500, str(e))

    @app.exception_handler(HTTPException)
    async def _http_error(_, e: HTTPException):
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _unexpected(_, e: Exception):  # a bug, still answered as JSON and counted (the server logs it)
        metrics.reject(500)
        return error_response(500, f"internal error: {type(e).__name__}")

    # a dependency, not an HTTP middleware: BaseHTTPMiddleware would hide client disconnects
    async def check_api_key(request: Request) -> None:
        if state.api_key and request.headers.get("authorization") != f"Bearer {state.api_key}":
            raise Unauthorized("missing or wrong API key (send Authorization: Bearer <key>)")

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(check_api_key)])

    @app.get("/health")
    async def health():
        return Response(status_code=200)

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(await state.client.workers(), await state.client.control()), media_type="text/plain; version=0.0.4")

    @v1.get("/models")
    async def models():
        info = state.client.info
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": 0,
                                            "owned_by": "pdserve", "max_model_len": info.max_model_len}]}

    @v1.post("/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        params = body.sampling_params()
        prompts = [_tokenize_prompt(state, p) for p in body.prompts()]
        for ids in prompts:
            state.client.check(ids, params)
        rid = f"cmpl-{uuid.uuid4().hex}"
        events = merge([generate_events(state.client, state.tokenizer, f"{rid}-{i}", ids, params, metrics,
                                        index_base=i * params.n) for i, ids in enumerate(prompts)])
        shape = formats.CompletionShape(rid, state.model_name, state.tokenizer, len(prompts), params.n,
                                        _wants_timings(request))
        return await _respond(request, body.stream, body.include_usage, events, shape, metrics)

    @v1.post("/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        params = body.sampling_params()
        ids = state.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages],
                                                  body.add_generation_prompt)
        params = _with_room(params, state, ids)
        state.client.check(ids, params)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        events = generate_events(state.client, state.tokenizer, rid, ids, params, metrics)
        shape = formats.ChatShape(rid, state.model_name, state.tokenizer, 1, params.n, _wants_timings(request))
        return await _respond(request, body.stream, body.include_usage, events, shape, metrics)

    app.include_router(v1)
    return app


def _check_model(state: ServerState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ModelNotFound(f"The model `{model}` does not exist (this server serves `{state.model_name}`).",
                            param="model", code="model_not_found")


def _wants_timings(request: Request) -> bool:
    """`x-pdserve-timings: 1` asks for each choice's per-phase seconds in its last chunk."""
    return request.headers.get(TIMINGS_HEADER, "").lower() in ("1", "true", "yes")


def _tokenize_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("prompt must not be empty", param="prompt")
        return state.tokenizer.encode(prompt)
    if not isinstance(prompt, list) or not all(isinstance(t, int) for t in prompt):
        raise RequestError("prompt must be a string, a list of strings or a list of token ids", param="prompt")
    return prompt


def _with_room(params: SamplingParams, state: ServerState, ids: list[int]) -> SamplingParams:
    """Chat without max_tokens may use what is left of the context."""
    if params.max_tokens is not None or len(ids) >= state.client.info.max_model_len:
        return params
    return replace(params, max_tokens=state.client.info.max_model_len - len(ids))


async def _respond(request: Request, stream: bool, include_usage: bool,
                   events: AsyncIterator[ChoiceEvent], shape: formats.Shape, metrics: ServerMetrics):
    """A stream's headers go out with its first event: a request refused meanwhile (no room:
    503 with Retry-After; bad input: 4xx) gets its status, not a 200 and an error event."""
    if stream:
        try:
            first = await _unless_gone(request, anext(events, _END))
        except BaseException:
            await events.aclose()
            raise
        if first is _GONE:
            await events.aclose()
            return Response(status_code=499)
        return StreamingResponse(_sse(_prepend(first, events), shape, include_usage, metrics),
                                 media_type="text/event-stream")
    result = await _unless_gone(request, _collect(events, shape))
    return Response(status_code=499) if result is _GONE else JSONResponse(result)


_END, _GONE = object(), object()


async def _unless_gone(request: Request, awaitable):
    """The awaitable's result, or _GONE (the awaitable cancelled: closing the events aborts
    the request) when the client disconnects first."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
        await asyncio.gather(task, watcher, return_exceptions=True)
    return _GONE if task.cancelled() else task.result()


async def _prepend(first, events: AsyncIterator[ChoiceEvent]) -> AsyncIterator[ChoiceEvent]:
    async with aclosing(events):
        if first is not _END:
            yield first
            async for event in events:
                yield event


async def _collect(events: AsyncIterator[ChoiceEvent], shape: formats.Shape) -> dict:
    async with aclosing(events):
        async for event in events:
            shape.add(event)
    return shape.final()


async def _sse(events: AsyncIterator[ChoiceEvent], shape: formats.Shape, include_usage: bool,
               metrics: ServerMetrics):
    try:
        for chunk in shape.opening():
            yield f"data: {json.dumps(chunk)}\n\n"
        async with aclosing(events):
            async for event in events:
                chunk = shape.chunk(event)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            yield f"data: {json.dumps(shape.usage_chunk())}\n\n"
    except Exception as e:  # after the headers went out, errors travel as an event
        status = e.status_code if isinstance(e, RequestError) else 500
        metrics.reject(status)
        kind = "internal_server_error" if status >= 500 else "invalid_request_error"
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': kind, 'code': status}})}\n\n"
    yield "data: [DONE]\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return

