"""Helpers of the tests that deploy pdserve on a local Ray cluster (tests/scheduler/test_cluster.py,
tests/vllm/test_vllm_cluster.py): requests over HTTP, the workers' registry, leak checks, streams cut
or followed to the end, and a worker hung then killed under load."""

from __future__ import annotations

import math
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from helpers import LiveServer, wait_for
from parity_cases import NUM_TOKENS

TIMEOUT_S = 120


def complete(server: LiveServer, prompt: list[int], n_tokens: int = NUM_TOKENS, **extra) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": n_tokens, "min_tokens": n_tokens, "temperature": 0,
            **extra}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S,
                      headers={"x-pdserve-timings": "1"})


def all_in_parallel(fn, items, workers: int = 8) -> list:
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def workers(server: LiveServer) -> dict[str, dict]:
    import ray
    return {w["worker_id"]: w for w in ray.get(server.cluster.scheduler.workers.remote())}


def assert_clean(server: LiveServer, timeout_s: float = 10) -> None:
    """Leak check: every worker holds no request and no KV block."""
    import ray
    handles = list(server.cluster.workers.values())

    def clean() -> bool:
        return all(b == 0 for b in ray.get([h.num_used_blocks.remote() for h in handles])) and \
            all(n == 0 for n in ray.get([h.num_requests.remote() for h in handles]))
    wait_for(clean, "every worker to free its blocks", timeout_s)


def stop_and_check_processes(server: LiveServer) -> None:
    pids = [info.pid for info in server.cluster.describe()]
    server.stop()

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_for(lambda: all(gone(p) for p in pids), "worker processes to exit", 15)


def stream_and_cut(server: LiveServer, prompt: list[int], max_tokens: int, cut_after_events: int,
                    cut_after_s: float) -> str:
    """Streams a request and hangs up after some events or some time, whichever first."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True}
    start = time.monotonic()
    events = 0
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events += 1
                if line == "data: [DONE]":
                    return "done"
            if events >= cut_after_events or time.monotonic() - start > cut_after_s:
                return "cut"
    return "ended"


def certain_outcomes(jobs: list[tuple]) -> tuple[int, int]:
    """How many of stream_and_cut's jobs must end "cut" (cut at the first line: after 0 events
    or 0 s) and how many must end "done" (never cut: more events than any stream has, no time
    limit), however fast the server is."""
    cut = sum(1 for _, _, events, seconds in jobs if events == 0 or seconds == 0)
    done = sum(1 for _, max_tokens, events, seconds in jobs if events > max_tokens + 3 and seconds == math.inf)
    return cut, done


def stream_all(server: LiveServer, prompt: list[int], max_tokens: int, first: threading.Event,
                ends: dict, key) -> list[str]:
    """Streams to the end, recording each data line and when the stream ended."""
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0, "stream": True}
    lines = []
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=TIMEOUT_S) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                lines.append(line)
                first.set()
    ends[key] = time.monotonic()
    return lines


def rejoined(server: LiveServer, worker_id: str, old_incarnation: str) -> bool:
    w = workers(server)[worker_id]
    return w["alive"] and w["incarnation"] != old_incarnation


def routed_to(server: LiveServer, worker_id: str, before: int, timeout_s: float = 5.0) -> None:
    """Waits until the front door has routed a request to worker_id since it had routed before
    (or a while has passed: the policy may have sent them all elsewhere)."""
    routed = server.app.state.pd.client.router.num_routed
    deadline = time.monotonic() + timeout_s
    while routed.get(worker_id, 0) <= before and time.monotonic() < deadline:
        time.sleep(0.02)


def hang_then_kill(server: LiveServer, worker_id: str, call, items) -> list:
    """Stops the worker (it looks alive for a moment, so requests are routed to it), sends the
    requests, waits until one was routed to it, kills it, and returns their results: each must
    end within 10 s of the kill."""
    pid = workers(server)[worker_id]["pid"]
    routed_before = server.app.state.pd.client.router.num_routed.get(worker_id, 0)
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(len(items)) as pool:
            futures = [pool.submit(call, server, item) for item in items]
            routed_to(server, worker_id, routed_before)
            killed_at = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            results = [f.result(TIMEOUT_S) for f in futures]
        assert time.monotonic() - killed_at < 10
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return results
