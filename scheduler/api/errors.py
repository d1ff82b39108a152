"""Errors only the HTTP front door raises (the engine's own are in engine/errors.py)."""

from __future__ import annotations

from engine.errors import RequestError


class Unauthorized(RequestError):
    status_code = 401


class ModelNotFound(RequestError):
    status_code = 404
