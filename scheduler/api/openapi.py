"""/openapi.json as the server really answers: FastAPI's schema with its 422 validation
response replaced by the statuses the front door sends, each with the OpenAI-style error
body it carries."""

from __future__ import annotations

from fastapi import FastAPI

ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["message", "type", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": {"type": ["string", "null"]}, "code": {"type": "string"}},
    }},
}
_GENERATION = {400: "Invalid request (body, sampling values, tokens, context length)",
               404: "No such model", 413: "Request body too large (--max-request-bytes)",
               500: "The engine failed while running the request",
               502: "The worker running the request failed or was marked down",
               503: "No room now, or shutting down (Retry-After says when to retry)",
               504: "The engine sent nothing for --stream-idle-timeout-s"}
_ANY = {500: "Internal error"}
_NAMED = {404: "No such model"}  # routes with a model id in the path
KEYED = ("/v1/", "/tokenize", "/detokenize")  # what the API key protects
_AUTH = {401: "Missing or wrong API key"}


def document_errors(app: FastAPI, v1_auth: bool, ops_auth: bool) -> None:
    """Makes app.openapi() document the statuses each route can answer with. v1_auth and
    ops_auth: whether /v1 and /metrics need the API key."""
    base = app.openapi

    def openapi() -> dict:
        if app.openapi_schema:
            return app.openapi_schema
        schema = base()
        for path, operations in schema.get("paths", {}).items():
            for method, op in operations.items():
                statuses = dict(_GENERATION if method == "post" else _ANY)
                if "{" in path:
                    statuses.update(_NAMED)
                if (v1_auth and path.startswith(KEYED)) or (ops_auth and path == "/metrics"):
                    statuses.update(_AUTH)
                responses = op.setdefault("responses", {})
                responses.pop("422", None)
                for status, description in sorted(statuses.items()):
                    responses[str(status)] = {"description": description, "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            components.pop(unused, None)
        components["ErrorResponse"] = ERROR_SCHEMA
        app.openapi_schema = schema
        return schema

    app.openapi = openapi
