"""The front door's endpoints besides generation, shaped as vLLM's: /health (503 while no
engine, or no worker of a pool, can serve), /version, /v1/models/{id}, /tokenize and
/detokenize (a prompt or chat messages to token ids and back, with the server's tokenizer
and chat template)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from engine.errors import RequestError
from scheduler.api.errors import ModelNotFound
from scheduler.api.protocol import STRICT, ChatMessage, Tool
from scheduler.api.tools import template_messages


def pdserve_version() -> str:
    try:
        return version("pdserve")
    except PackageNotFoundError:
        return "unknown"


class TokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = STRICT

    model: str | None = None
    tokens: list[int] = Field(min_length=0)


def add_utility_routes(root: APIRouter, keyed: APIRouter, v1: APIRouter, state, off_loop) -> None:
    """root: open routes; keyed: routes behind the API key; state: the server's ServerState;
    off_loop runs text work off the event loop."""

    @root.get("/health", response_class=Response, responses={200: {"description": "An engine can serve"},
                                                            503: {"description": "No engine or pool can serve now"}})
    async def health():
        why = await state.client.unready()
        if why is None:
            return Response(status_code=200)
        return JSONResponse({"status": "unavailable", "reason": why}, status_code=503)

    @root.get("/version")
    async def server_version():
        return {"version": pdserve_version()}

    @v1.get("/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != state.model_name:
            raise ModelNotFound(f"The model `{model_id}` does not exist.", param="model", code="model_not_found")
        return {"id": state.model_name, "object": "model", "created": 0, "owned_by": "pdserve",
                "max_model_len": state.client.info.max_model_len}

    @keyed.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(state, body.model)
        if (body.prompt is None) == (body.messages is None):
            raise RequestError("send either prompt or messages", param="prompt")
        tok = state.tokenizer

        def run() -> list[int]:
            if body.prompt is not None:
                return tok.hf.encode(body.prompt, add_special_tokens=body.add_special_tokens)
            messages = template_messages([m.as_template_input() for m in body.messages])
            tools = [t.model_dump(exclude_none=True) for t in body.tools] if body.tools else None
            return tok.apply_chat_template(messages, body.add_generation_prompt, tools, body.continue_final_message,
                                           body.chat_template_kwargs)
        ids = await off_loop(run)
        strs = [tok.hf.convert_ids_to_tokens(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": state.client.info.max_model_len, "tokens": ids,
                "token_strs": strs}

    @keyed.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(state, body.model)
        vocab = state.client.info.vocab_size
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise RequestError(f"tokens must be in [0, {vocab})", param="tokens")
        return {"prompt": await off_loop(lambda: state.tokenizer.decode(body.tokens, skip_special_tokens=False))}


def check_model(state, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ModelNotFound(f"The model `{model}` does not exist (this server serves `{state.model_name}`).",
                            param="model", code="model_not_found")
