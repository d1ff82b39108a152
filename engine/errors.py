"""Typed errors that carry the HTTP status a front door should answer with."""

from __future__ import annotations


class RequestError(ValueError):
    """A request the engine will not run; nothing was changed by it."""

    status_code = 400

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class Unauthorized(RequestError):
    status_code = 401


class ModelNotFound(RequestError):
    status_code = 404


class ContextLengthExceeded(RequestError):
    def __init__(self, message: str):
        super().__init__(message, param=None, code="context_length_exceeded")
