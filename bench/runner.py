"""Drives one load phase against one server: requests sent at their arrival times, at most
max_concurrency in flight, each bounded by a timeout, sending stopped after duration_s.

Progress lives in a `PhaseState` the caller holds, so an interrupted phase (Ctrl-C) still
has every finished record and its elapsed time for a partial report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from bench.client import auth_headers, request_body, send
from bench.datasets import BenchRequest
from bench.metrics import SLO, RequestRecord


@dataclass(frozen=True)
class Phase:
    target: str
    base_url: str
    endpoint: str
    model: str | None
    rate: float
    requests: list[BenchRequest]
    arrivals_s: list[float]
    max_concurrency: int | None = None
    timeout_s: float = 300.0
    duration_s: float | None = None  # stop sending new requests after this long
    ignore_eos: bool = True
    api_key: str | None = None
    temperature: float = 0.0


@dataclass
class PhaseState:
    phase: Phase
    slo: SLO = SLO()
    records: list[RequestRecord] = field(default_factory=list)
    sent: int = 0
    start_s: float | None = None
    end_s: float | None = None
    on_change: Callable[["PhaseState"], None] | None = None

    @property
    def elapsed_s(self) -> float:
        if self.start_s is None:
            return 0.0
        return (self.end_s or time.perf_counter()) - self.start_s

    @property
    def num_failed(self) -> int:
        return sum(1 for r in self.records if not r.ok)

    @property
    def attainment(self) -> float | None:
        return self.slo.attainment(self.records)

    def _changed(self) -> None:
        if self.on_change:
            self.on_change(self)


async def run_phase(state: PhaseState) -> PhaseState:
    phase = state.phase
    assert len(phase.requests) == len(phase.arrivals_s)
    limit = asyncio.Semaphore(phase.max_concurrency or len(phase.requests) or 1)
    timeout = httpx.Timeout(phase.timeout_s, connect=10.0)
    limits = httpx.Limits(max_connections=phase.max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=auth_headers(phase.api_key)) as http:
        state.start_s = t0 = time.perf_counter()

        async def one(index: int) -> None:
            delay = phase.arrivals_s[index] - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            async with limit:
                if phase.duration_s is not None and time.perf_counter() - t0 > phase.duration_s:
                    return  # past the phase's duration: not sent, not counted
                request = phase.requests[index]
                body = request_body(phase.endpoint, phase.model, request.prompt, request.max_tokens, phase.ignore_eos,
                                    phase.temperature)
                state.sent += 1
                state._changed()
                record = await send(http, phase.base_url, phase.endpoint, body, t0, phase.timeout_s)
            record.index = index
            if not record.prompt_tokens:
                record.prompt_tokens = request.prompt_tokens
            state.records.append(record)
            state._changed()

        try:
            await asyncio.gather(*(one(i) for i in range(len(phase.requests))))
        finally:
            state.end_s = time.perf_counter()
    return state
