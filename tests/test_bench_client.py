"""bench's client and phase runner against pdserve (tiny model) and a misbehaving stub."""

import asyncio
import json
import threading
import time

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.runner import Phase, run_phase
from conftest import free_port


def test_every_request_against_pdserve_is_accounted_for(tiny_server):
    for endpoint in ("completions", "chat"):
        phase = Phase(tiny_server.url, endpoint, "tiny", [("Once upon a time", 5)] * 6, [0.0] * 6,
                      max_concurrency=3, timeout_s=60)
        records, duration = asyncio.run(run_phase(phase))
        assert len(records) == 6 and duration > 0
        assert all(r.ok for r in records), [r.error for r in records]
        assert all(r.output_tokens == 5 and r.ttft_s > 0 and r.e2el_s >= r.ttft_s for r in records)


def _stub_app() -> FastAPI:
    app = FastAPI()

    def sse(chunks, done=True):
        async def gen():
            for delay, payload in chunks:
                await asyncio.sleep(delay)
                yield f"data: {json.dumps(payload)}\n\n"
            if done:
                yield "data: [DONE]\n\n"
        return StreamingResponse(gen(), media_type="text/event-stream")

    def text(t):
        return {"choices": [{"index": 0, "text": t, "finish_reason": None}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        prompt = (await request.json())["prompt"]
        if prompt == "500":
            return JSONResponse({"error": {"message": "overloaded"}}, status_code=500)
        if prompt == "cut":
            return sse([(0, text("a")), (0, text("b"))], done=False)
        if prompt == "error":
            return sse([(0, text("a")), (0, {"error": {"message": "engine died"}})])
        first_delay = 0.3 if prompt == "slow" else 0.0
        return sse([(first_delay, text("x")), (0.05, text("y")), (0.05, text("z")),
                    (0, {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 3}})])
    return app


@pytest.fixture(scope="module")
def stub():
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(_stub_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


def test_misbehaving_server_failures_are_counted_with_reasons(stub):
    prompts = ["ok", "slow", "500", "cut", "error", "ok"]
    phase = Phase(stub, "completions", None, [(p, 3) for p in prompts], [0.0, 0.0, 0.0, 0.0, 0.0, 0.1], timeout_s=10)
    seen = []
    records, _ = asyncio.run(run_phase(phase, on_done=seen.append))
    assert len(seen) == 6
    by_prompt = dict(zip(prompts[:5], records[:5]))
    assert by_prompt["ok"].ok and by_prompt["ok"].output_tokens == 3 and len(by_prompt["ok"].chunk_s) == 3
    assert by_prompt["slow"].ok and by_prompt["slow"].ttft_s >= 0.3
    assert by_prompt["ok"].tpot_s >= 0.045  # the stub sleeps 50 ms between tokens
    assert not by_prompt["500"].ok and "HTTP 500" in by_prompt["500"].error
    assert not by_prompt["cut"].ok and "before [DONE]" in by_prompt["cut"].error
    assert not by_prompt["error"].ok and "engine died" in by_prompt["error"].error
    assert records[5].ok and records[5].send_s >= 0.1  # sent at its arrival time


def test_connection_refused_is_a_failure_not_a_crash():
    phase = Phase(f"http://127.0.0.1:{free_port()}", "completions", None, [("x", 2)] * 2, [0.0, 0.0], timeout_s=5)
    records, _ = asyncio.run(run_phase(phase))
    assert [r.ok for r in records] == [False, False] and all("Connect" in r.error for r in records)
