"""Drives one load phase: requests sent at their arrival times, at most max_concurrency in
flight, each bounded by a timeout; returns every request's record and the phase duration."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from bench.client import request_body, send
from bench.metrics import RequestRecord


@dataclass(frozen=True)
class Phase:
    base_url: str
    endpoint: str
    model: str | None
    requests: list[tuple[str, int]]  # (prompt, max_tokens)
    arrivals_s: list[float]
    max_concurrency: int | None = None
    timeout_s: float = 300.0
    ignore_eos: bool = True


async def run_phase(phase: Phase, on_done: Callable[[RequestRecord], None] | None = None) -> tuple[list[RequestRecord], float]:
    assert len(phase.requests) == len(phase.arrivals_s)
    limit = asyncio.Semaphore(phase.max_concurrency or len(phase.requests) or 1)
    timeout = httpx.Timeout(phase.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=phase.max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()

        async def one(index: int) -> RequestRecord:
            delay = phase.arrivals_s[index] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            prompt, max_tokens = phase.requests[index]
            async with limit:
                body = request_body(phase.endpoint, phase.model, prompt, max_tokens, phase.ignore_eos)
                record = await send(http, phase.base_url, phase.endpoint, body, t0)
            if on_done:
                on_done(record)
            return record

        records = await asyncio.gather(*(one(i) for i in range(len(phase.requests))))
        return list(records), time.perf_counter() - t0
