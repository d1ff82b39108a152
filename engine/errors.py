"""Engine-side errors. A RequestError carries the HTTP status a front door answers with;
an EngineError is a failure of the engine itself while it ran a request."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine will not run; nothing was changed by it."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str):
        super().__init__(message, param=None, code="context_length_exceeded")


class Overloaded(RequestError):
    """No room for the request now (HTTP 503 with Retry-After)."""

    status_code = 503


class EngineError(RuntimeError):
    """The engine failed while running a request (HTTP 500 / an error event)."""

    status_code = 500


def failure(message: str, status: int) -> RequestError | EngineError:
    """The typed error for a request that failed with `status` (a 4xx: its own parameters)."""
    return RequestError(message) if 400 <= status < 500 else EngineError(message)


def error_status(e: Exception) -> int:
    """The HTTP status a request failed by `e` is answered with (500 for anything untyped)."""
    return e.status_code if isinstance(e, (RequestError, EngineError)) else 500
