"""A minimal OpenAI-compatible front for vLLM's own 1P1D disaggregation (NixlConnector):
prefill with max_tokens=1 and do_remote_decode, then hand the returned kv_transfer_params
to the decode server and stream its answer back. Round trip only; no retries.
Usage: vllm_pd_proxy.py PORT PREFILL_URL DECODE_URL"""
import sys

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

port, prefill, decode = int(sys.argv[1]), sys.argv[2].rstrip("/"), sys.argv[3].rstrip("/")
app = FastAPI()
client = httpx.AsyncClient(timeout=None)
KV = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
      "remote_block_ids": None, "remote_host": None, "remote_port": None}


@app.get("/v1/models")
async def models():
    return (await client.get(decode + "/v1/models")).json()


@app.get("/health")
async def health():
    ok = True
    for u in (prefill, decode):
        ok = ok and (await client.get(u + "/health")).status_code == 200
    return JSONResponse({}, status_code=200 if ok else 503)


async def relay(path: str, req: Request):
    body = await req.json()
    pre = dict(body, max_tokens=1, stream=False, kv_transfer_params=KV)
    pre.pop("max_completion_tokens", None)
    pre.pop("stream_options", None)
    r = await client.post(prefill + path, json=pre)
    if r.status_code != 200:
        return JSONResponse(r.json(), status_code=r.status_code)
    body["kv_transfer_params"] = r.json().get("kv_transfer_params")
    if not body.get("stream"):
        r2 = await client.post(decode + path, json=body)
        return JSONResponse(r2.json(), status_code=r2.status_code)

    async def gen():
        async with client.stream("POST", decode + path, json=body) as r2:
            async for chunk in r2.aiter_raw():
                yield chunk
    return StreamingResponse(gen(), media_type="text/event-stream")


@app.post("/v1/completions")
async def completions(req: Request):
    return await relay("/v1/completions", req)


@app.post("/v1/chat/completions")
async def chat(req: Request):
    return await relay("/v1/chat/completions", req)


uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")
