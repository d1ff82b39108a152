"""Errors only the HTTP front door raises (the engine's own are in engine/errors.py), and the
OpenAI-style body every error is answered with."""

from __future__ import annotations

from engine.errors import RequestError


class Unauthorized(RequestError):
    status_code = 401


class ModelNotFound(RequestError):
    status_code = 404


_TYPES = {401: "authentication_error", 404: "not_found_error", 503: "service_unavailable_error",
          504: "timeout_error"}


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "internal_server_error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    """code is always a string: the error's own name (context_length_exceeded, model_not_found) or its status."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": str(code or status)}}
