"""The front door's bounds on work, time and size, and the ASGI layer that enforces the body
size before a handler runs.

Every bound has its default here: a request too large (413), too many prompts or samples in
one request (400), too many requests queued for their first token (503 with Retry-After),
a stream whose worker went quiet (an error event), and the HTTP server's own timeouts.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from scheduler.api.errors import error_body

MiB = 1 << 20


@dataclass(frozen=True)
class FrontDoorLimits:
    max_request_bytes: int = 4 * MiB
    """Largest request body accepted; a larger one gets 413 before it is parsed."""
    max_prompts_per_request: int = 1024
    """Most prompts in one completions request."""
    max_sequences_per_request: int = 1024
    """Most sequences one request may start: prompts times n."""
    default_max_tokens: int = 1024
    """chat: max_tokens of a request that sets none (never beyond what the context leaves); completions default to 16 as OpenAI's do."""
    max_queued_requests: int = 128
    """colocated and semi-pd: most requests waiting for their first token; then 503 with Retry-After (disagg: --max-waiting-for-blocks)."""
    stream_idle_timeout_s: float = 300.0
    """A request whose engine sends nothing for this long after its first token (a hung worker) ends with 504 (streams: an error event); 0: never."""
    header_timeout_s: float = 10.0
    """A connection must send a complete request head within this long of opening (or of its previous response); else it is closed."""
    keep_alive_timeout_s: float = 5.0
    """An idle keep-alive connection is closed after this long."""
    drain_timeout_s: float = 10.0
    """On shutdown, in-flight requests get this long to finish; the rest end cleanly (streams: an error event and [DONE]; others: a JSON 503)."""

    def __post_init__(self) -> None:
        counts = (self.max_request_bytes, self.max_prompts_per_request, self.max_sequences_per_request,
                  self.default_max_tokens, self.max_queued_requests)
        times = (self.header_timeout_s, self.keep_alive_timeout_s, self.drain_timeout_s)
        if min(counts) < 1 or min(times) <= 0 or self.stream_idle_timeout_s < 0:
            raise ValueError("--max-request-bytes, --max-prompts-per-request, --max-sequences-per-request, "
                             "--default-max-tokens and --max-queued-requests must be at least 1; the timeouts "
                             "positive (--stream-idle-timeout-s 0: none)")


Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class BodyLimit:
    """ASGI middleware: reads a request's body up to `max_bytes` before the app sees it; a
    larger one (by Content-Length, or by what arrives) is answered 413 with a JSON error
    and `on_refused()` is called. Below the limit the app receives the body as one message,
    then the connection's own messages (a disconnect)."""

    def __init__(self, app, max_bytes: int, on_refused: Callable[[], None] = lambda: None):
        self.app, self.max_bytes, self.on_refused = app, max_bytes, on_refused

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or ()).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body: dict | None = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> dict:
            nonlocal body
            if body is not None:
                message, body = body, None
                return message
            return await receive()
        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        self.on_refused()
        payload = json.dumps(error_body(413, f"the request body is larger than {self.max_bytes} bytes "
                                             "(--max-request-bytes)")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
