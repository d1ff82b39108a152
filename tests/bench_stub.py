"""A small misbehaving OpenAI-compatible server for bench tests; what a prompt says is what
the stub does: "ok" (3 tokens, 50 ms apart), "slow" (first token after 300 ms), "500",
"cut" (stream ends without [DONE]), "error" (an error event mid-stream), "hang" (30 s
before anything)."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

SLOW_FIRST_S = 0.3
GAP_S = 0.05


def stub_app() -> FastAPI:
    app = FastAPI()
    app.state.prompts = []
    app.state.bodies = []  # every request body, as sent
    app.state.num_completed = 0  # streams that reached [DONE]

    def sse(chunks, done=True):
        async def gen():
            for delay, payload in chunks:
                await asyncio.sleep(delay)
                yield f"data: {json.dumps(payload)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
                app.state.num_completed += 1
        return StreamingResponse(gen(), media_type="text/event-stream")

    def text(t):
        return {"choices": [{"index": 0, "text": t, "finish_reason": None}]}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "stub-model", "object": "model", "max_model_len": 4096}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        prompt = body["prompt"]
        app.state.prompts.append(prompt)
        app.state.bodies.append(body)
        if prompt == "500":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        if prompt == "cut":
            return sse([(0, text("a")), (0, text("b"))], done=False)
        if prompt == "error":
            return sse([(0, text("a")), (0, {"error": {"message": "engine died"}})])
        if prompt == "hang":
            return sse([(30, text("late"))])
        first_delay = SLOW_FIRST_S if prompt == "slow" else 0.0
        return sse([(first_delay, text("x")), (GAP_S, text("y")), (GAP_S, text("z")),
                    (0, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}})])
    return app
