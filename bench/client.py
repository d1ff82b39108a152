"""One streamed request against any OpenAI-compatible server, as the client sees it.

Every outcome becomes a RequestRecord: HTTP errors, connection failures, timeouts, error
events mid-stream and streams cut before `[DONE]` are failures with a reason, never
exceptions. Chunk times are taken when a chunk carrying content arrives.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from bench.metrics import RequestRecord

# asks pdserve for each request's per-phase timings; other servers ignore the header
TIMINGS_HEADERS = {"x-pdserve-timings": "1"}


def auth_headers(api_key: str | None) -> dict[str, str] | None:
    return {"Authorization": f"Bearer {api_key}"} if api_key else None


def request_body(endpoint: str, model: str | None, prompt: str, max_tokens: int, ignore_eos: bool,
                 temperature: float = 0.0) -> dict:
    body: dict = {"max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True},
                  "temperature": temperature}
    if model:
        body["model"] = model
    if ignore_eos:
        body["ignore_eos"] = True  # vLLM / pdserve extension: fixed output lengths
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    return body


def _content(chunk: dict, endpoint: str) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return (choice.get("delta") or {}).get("content") or "" if endpoint == "chat" else choice.get("text") or ""


async def send(http: httpx.AsyncClient, base_url: str, endpoint: str, body: dict, t0: float,
               timeout_s: float = 300.0) -> RequestRecord:
    """One request, bounded as a whole by timeout_s (a server that trickles is cut too)."""
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    record = RequestRecord(send_s=time.perf_counter() - t0)
    num_chunks = 0
    usage_tokens = None
    try:
        async with (asyncio.timeout(timeout_s),
                    http.stream("POST", base_url.rstrip("/") + path, json=body, headers=TIMINGS_HEADERS) as response):
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")[:200]
                return _failed(record, f"HTTP {response.status_code}: {text}")
            done = False
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    return _failed(record, f"error event: {chunk['error'].get('message', chunk['error'])}")
                if _content(chunk, endpoint):
                    record.chunk_s.append(time.perf_counter() - t0)
                    num_chunks += 1
                for choice in chunk.get("choices") or []:
                    record.timings = choice.get("timings") or record.timings
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    record.prompt_tokens = chunk["usage"].get("prompt_tokens") or 0
            if not done:
                return _failed(record, "stream ended before [DONE]")
    except TimeoutError:
        return _failed(record, f"timed out after {timeout_s:g} s")
    except (httpx.HTTPError, json.JSONDecodeError, OSError) as e:
        return _failed(record, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
    if not record.chunk_s:
        return _failed(record, "no content in the stream")
    record.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    return record


def _failed(record: RequestRecord, reason: str) -> RequestRecord:
    record.ok = False
    record.error = reason
    return record
