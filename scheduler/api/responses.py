"""A request's events become its HTTP response: a JSON body, or an SSE stream whose headers
go out only with its first event, so a request refused meanwhile (no room: 503 with
Retry-After; bad input: 4xx) gets its status, not a 200 and an error event.

Every error is an OpenAI-style JSON body (`error_response`), or inside a stream an error
event followed by `data: [DONE]`. While a request runs, its events are bounded in time
(`bounded`): an engine that goes quiet for the idle timeout after the first token ends the
request with a 504, and a server shutting down ends it with a 503; a client that disconnects cancels it (the
engine aborts it, freeing its blocks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import aclosing

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from engine.errors import EngineError, Overloaded, error_status
from scheduler.aio import until
from scheduler.api import formats
from scheduler.api.errors import error_body
from scheduler.api.generation import ChoiceEvent
from scheduler.metrics import ServerMetrics

RETRY_AFTER_S = "1"  # what a 503 (no room now, or shutting down) asks clients to wait


class ShuttingDown(Overloaded):
    def __init__(self) -> None:
        super().__init__("the server is shutting down; retry on another replica or later")


class WorkerTimeout(EngineError):
    """The engine sent nothing for the stream idle timeout."""

    status_code = 504


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    headers = {"Retry-After": RETRY_AFTER_S} if status == 503 else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def bounded(events: AsyncIterator[ChoiceEvent], idle_timeout_s: float,
            closing: asyncio.Event) -> AsyncIterator[ChoiceEvent]:
    """events, ended with WorkerTimeout when one after the first takes longer than
    idle_timeout_s (0: no bound; the first may wait its turn in a queue, which is bounded
    itself), or with ShuttingDown once `closing` is set. Either way the events are closed
    first, which aborts the request in the engine."""
    def quiet() -> WorkerTimeout:
        return WorkerTimeout(f"the engine sent nothing for {idle_timeout_s:g} s (--stream-idle-timeout-s); "
                             "the request was ended")
    return until(events, closing, ShuttingDown, idle_timeout_s, quiet)


async def respond(request: Request, stream: bool, include_usage: bool, events: AsyncIterator[ChoiceEvent],
                  shape: formats.Shape, metrics: ServerMetrics):
    if stream:
        try:
            first = await _unless_gone(request, anext(events, _END))
        except BaseException:
            await events.aclose()
            raise
        if first is _GONE:
            await events.aclose()
            return Response(status_code=499)
        return StreamingResponse(sse(_prepend(first, events), shape, include_usage, metrics),
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


async def sse(events: AsyncIterator[ChoiceEvent], shape: formats.Shape, include_usage: bool,
              metrics: ServerMetrics):
    try:
        async with aclosing(events):
            async for event in events:
                chunk = shape.chunk(event)
                if chunk is not None:
                    yield f"data: {json.dumps(chunk)}\n\n"
        if include_usage:
            yield f"data: {json.dumps(shape.usage_chunk())}\n\n"
    except Exception as e:  # after the headers went out, errors travel as an event
        status = error_status(e)
        metrics.reject(status)
        body = error_body(status, str(e))
        del body["error"]["param"]
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
