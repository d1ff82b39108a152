"""The front door's bounds over a fake engine client: body size (413), tokenisation off the
event loop, prompts and sequences per request, chat's default max_tokens, the stream idle
timeout, the request-head deadline, a draining shutdown, the API key over /metrics and
/openapi.json, and the statuses /openapi.json documents."""

import json
import socket
import threading
import time

import httpx
import psutil
import pytest

from scheduler.api.http_server import make_server
from scheduler.api.limits import FrontDoorLimits
from scheduler.api.server import ServerState, build_app
from scheduler.metrics import ServerMetrics
from scheduler.tokenizer import Tokenizer

from helpers import FakeEngineClient, free_port, serving, wait_for

TIMEOUT_S = 30


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return Tokenizer.load(tiny_llama)


@pytest.fixture
def door(tokenizer):
    """(url, fake client, metrics) of a front door with the given limits."""
    made = []

    def make(limits=FrontDoorLimits(), **state):
        fake, metrics = FakeEngineClient(), ServerMetrics()
        ctx = serving(build_app(ServerState(fake, tokenizer, "fake", metrics=metrics, limits=limits, **state)), limits)
        made.append((ctx, fake))
        return ctx.__enter__(), fake, metrics

    yield make
    for ctx, fake in made:
        fake.release.set()
        fake.unstall.set()
        ctx.__exit__(None, None, None)
        assert not fake.active


def rejected(metrics, status: int) -> float:
    return metrics.registry.get_sample_value("pdserve_requests_rejected_total", {"status": str(status)}) or 0


def test_a_body_beyond_the_limit_is_a_413_before_it_is_parsed(door):
    url, fake, metrics = door(FrontDoorLimits(max_request_bytes=1 << 20))
    big = {"prompt": "a " * 5242880, "max_tokens": 4}  # the 10 MB prompt
    r = httpx.post(url + "/v1/completions", json=big, timeout=TIMEOUT_S)
    assert r.status_code == 413 and r.json()["error"]["code"] == "413" and "--max-request-bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: counted as it arrives
        for _ in range(3):
            yield b" " * (1 << 19)
    r = httpx.post(url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"},
                   timeout=TIMEOUT_S)
    assert r.status_code == 413 and rejected(metrics, 413) == 2 and not fake.checked
    assert httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 2}, timeout=TIMEOUT_S).status_code == 200


def test_tokenisation_never_holds_the_event_loop(door, tokenizer, monkeypatch):
    """A prompt whose tokenisation is held on purpose: /health and another stream still answer."""
    url, fake, _ = door()
    entered, release = threading.Event(), threading.Event()
    real = tokenizer.encode

    def held(text):
        if text.startswith("held"):
            entered.set()
            release.wait(TIMEOUT_S)
        return real(text)
    monkeypatch.setattr(tokenizer, "encode", held)
    result = {}
    slow = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        url + "/v1/completions", json={"prompt": "held up", "max_tokens": 2}, timeout=TIMEOUT_S)))
    slow.start()
    try:
        assert entered.wait(TIMEOUT_S)
        assert httpx.get(url + "/health", timeout=5).status_code == 200
        other = httpx.post(url + "/v1/completions", json={"prompt": "other", "max_tokens": 3, "stream": True}, timeout=5)
        assert other.status_code == 200 and other.text.endswith("data: [DONE]\n\n")
    finally:
        release.set()
        slow.join(TIMEOUT_S)
    assert result["r"].status_code == 200


def test_a_large_prompt_leaves_no_memory_behind(tokenizer):
    """Tokenising 2 MB of text takes ~0.6 GB of scratch memory that malloc would otherwise keep."""
    text = "a " * 1_000_000
    tokenizer.encode(text)
    before = psutil.Process().memory_info().rss
    for _ in range(3):
        tokenizer.encode(text)
    assert psutil.Process().memory_info().rss - before < 150 << 20


def test_prompts_and_sequences_per_request_are_capped(door):
    url, fake, _ = door(FrontDoorLimits(max_prompts_per_request=300, max_sequences_per_request=600))
    ok = httpx.post(url + "/v1/completions", json={"prompt": [[5, 6]] * 256, "max_tokens": 1}, timeout=TIMEOUT_S)
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 256
    many = httpx.post(url + "/v1/completions", json={"prompt": [[5]] * 301, "max_tokens": 1}, timeout=TIMEOUT_S)
    assert many.status_code == 400 and "--max-prompts-per-request" in many.json()["error"]["message"]
    wide = httpx.post(url + "/v1/completions", json={"prompt": [[5]] * 200, "n": 8, "max_tokens": 1}, timeout=TIMEOUT_S)
    assert wide.status_code == 400 and "1600 sequences" in wide.json()["error"]["message"]
    assert len(fake.checked) == 256  # refused before anything ran


def test_chat_without_max_tokens_gets_the_default(door):
    url, _, _ = door(FrontDoorLimits(default_max_tokens=5))
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, timeout=TIMEOUT_S)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("stream", [False, True])
def test_an_engine_that_goes_quiet_ends_the_request(door, stream):
    """Two tokens, then nothing: the request ends with a 504 (a stream: an error event and
    [DONE]). Waiting for the first token is not bounded by it (a queue is)."""
    url, fake, metrics = door(FrontDoorLimits(stream_idle_timeout_s=1.0))
    fake.stall_at = 2
    r = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 8, "stream": stream}, timeout=TIMEOUT_S)
    if stream:
        events = [line for line in r.text.split("\n\n") if line]
        assert r.status_code == 200 and events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["code"] == "504"
    else:
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"
    assert rejected(metrics, 504) == 1
    wait_for(lambda: not fake.active, "the stalled request to be closed")
    fake.stall_at = 0  # held before the first token, past the timeout: still served once released
    result = {}
    slow = threading.Thread(target=lambda: result.setdefault("r", httpx.post(
        url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 3, "stream": stream}, timeout=TIMEOUT_S)))
    slow.start()
    wait_for(lambda: fake.active, "the request to wait for its first token")
    time.sleep(1.5)  # longer than the idle timeout on purpose: it must not apply here
    fake.unstall.set()
    slow.join(TIMEOUT_S)
    assert result["r"].status_code == 200 and "error" not in result["r"].text


def test_a_connection_must_send_its_request_head_in_time(door):
    url, _, _ = door(FrontDoorLimits(header_timeout_s=0.5))
    port = int(url.rsplit(":", 1)[1])
    silent = socket.create_connection(("127.0.0.1", port))
    trickle = socket.create_connection(("127.0.0.1", port))
    trickle.sendall(b"GET /health HTTP/1.1\r\n")
    closed = set()

    def check():
        for name, sock in (("silent", silent), ("trickle", trickle)):
            if name in closed:
                continue
            try:
                if name == "trickle":
                    sock.sendall(b"x")  # a byte at a time keeps the head incomplete
                sock.settimeout(0.05)
                if sock.recv(1) == b"":
                    closed.add(name)
            except TimeoutError:
                pass
            except OSError:
                closed.add(name)
        return len(closed) == 2
    try:
        wait_for(check, "both half-open connections to be closed", 15, every_s=0.1)
    finally:
        silent.close()
        trickle.close()
    assert httpx.get(url + "/health", timeout=5).status_code == 200


def test_shutdown_ends_running_requests_cleanly(tokenizer):
    fake = FakeEngineClient()
    fake.stall_at = 1
    port = free_port()
    server = make_server(build_app(ServerState(fake, tokenizer, "fake")), "127.0.0.1", port,
                         FrontDoorLimits(drain_timeout_s=0.3))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, "the server to start")
    url, got = f"http://127.0.0.1:{port}", {}

    def stream():
        with httpx.stream("POST", url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 8, "stream": True},
                          timeout=TIMEOUT_S) as r:
            got["stream"] = [line for line in r.iter_lines() if line]

    def plain():
        got["plain"] = httpx.post(url + "/v1/completions", json={"prompt": [5, 6], "max_tokens": 8}, timeout=TIMEOUT_S)
    clients = [threading.Thread(target=stream), threading.Thread(target=plain)]
    for c in clients:
        c.start()
    wait_for(lambda: len(fake.active) == 2, "both requests to run")
    server.should_exit = True
    for c in clients:
        c.join(TIMEOUT_S)
    thread.join(TIMEOUT_S)
    assert not thread.is_alive() and not fake.active
    assert got["stream"][-1] == "data: [DONE]" and json.loads(got["stream"][-2][6:])["error"]["code"] == "503"
    assert got["plain"].status_code == 503 and got["plain"].json()["error"]["type"] == "service_unavailable_error"


@pytest.mark.parametrize("protect", [False, True])
def test_the_api_key_covers_metrics_and_openapi_when_asked(door, protect):
    url, _, _ = door(api_key="k3y", api_key_protects_metrics=protect)
    for path in ("/metrics", "/openapi.json"):
        assert httpx.get(url + path, timeout=TIMEOUT_S).status_code == (401 if protect else 200)
        assert httpx.get(url + path, headers={"Authorization": "Bearer k3y"}, timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(url + "/health", timeout=TIMEOUT_S).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3x"}, timeout=TIMEOUT_S).status_code == 401


def test_openapi_documents_the_statuses_sent(door):
    url, _, _ = door(api_key="k3y")
    spec = httpx.get(url + "/openapi.json", timeout=TIMEOUT_S).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        statuses = set(spec["paths"][path]["post"]["responses"])
        assert {"200", "400", "401", "404", "413", "500", "503", "504"} <= statuses and "422" not in statuses
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]
    assert "ErrorResponse" in spec["components"]["schemas"] and "HTTPValidationError" not in spec["components"]["schemas"]

