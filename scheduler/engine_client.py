"""EngineClient: how the front door talks to an engine, whatever carries the calls.

`check` validates a request (before any response starts); `generate` then yields its
StepOutputs until all its samples finish, and assumes `check` passed: a request is
validated once, where it enters the process. Leaving the iterator early (client gone, stop
string) aborts what is left. `InProcessClient` drives an engine loop in this process
(colocated mode, tests), or semi-PD's pair of loops. This module imports no torch: the
engine comes in built.
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Protocol

from engine.config import Role
from engine.interface import WorkerEngine
from engine.outputs import EngineStats, StepOutput
from engine.sampling_params import SamplingParams
from scheduler.policies import WorkerLoad, use_kv_prediction
from scheduler.router import WorkerView


@dataclass(frozen=True)
class ModelInfo:
    name: str
    max_model_len: int
    vocab_size: int


class EngineClient(abc.ABC):
    info: ModelInfo

    @abc.abstractmethod
    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 arrival_s: float | None = None) -> AsyncIterator[StepOutput]: ...

    @abc.abstractmethod
    def abort(self, request_id: str, index: int | None = None) -> None: ...

    @abc.abstractmethod
    async def workers(self) -> list[WorkerView]:
        """Every worker behind this client with its current load (for /metrics)."""

    async def control(self) -> dict:
        """Routing decisions for /metrics: the role controller's last verdict and moves, workers
        lent by the mixed pool, prefills run on decode workers (empty when colocated)."""
        return {}

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError for a request the engine would refuse (before any response starts)."""

    async def unready(self) -> str | None:
        """Why no request could be served now (None: every pool has a worker up)."""
        views = await self.workers()
        if not views:
            return "no workers"
        for role in sorted({v.role for v in views}):
            if not any(v.load.alive for v in views if v.role == role):
                return f"no {role} worker is up"
        return None


class Loop(Protocol):
    """What InProcessClient drives: an engine loop (engine/worker/loop.py) or semi-PD's pair."""

    engine: WorkerEngine

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               sink: Callable[[StepOutput | Exception], None], arrival_s: float | None = None,
               validated: bool = False) -> None: ...

    def abort(self, request_id: str, index: int | None = None) -> None: ...

    def stats(self) -> EngineStats: ...

    @property
    def alive(self) -> bool: ...


class InProcessClient(EngineClient):
    def __init__(self, loop: Loop, name: str, slo_ttft_s: float | None = None, role: Role = Role.COLOCATED,
                 control: Callable[[], dict] | None = None):
        """slo_ttft_s: a request that leaves kv_prediction unset is prefilled from the KV
        predictor (if the engine has one) when full prefill would miss it (use_kv_prediction).
        control: semi-PD's split and controller state, for /metrics."""
        self.loop, self.slo_ttft_s, self.role, self._control = loop, slo_ttft_s, role, control
        self.engine_info = info = loop.engine.info
        self.info = ModelInfo(name, info.max_model_len, info.vocab_size)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.loop.engine.validate(prompt_token_ids, params)

    async def generate(self, request_id, prompt_token_ids, params, arrival_s=None):
        if params.kv_prediction is None and params.n == 1 and self.slo_ttft_s is not None \
                and self.engine_info.has_kv_predictor:  # no predictor: no stats read per request
            params = replace(params, kv_prediction=use_kv_prediction(self._load(), len(prompt_token_ids),
                                                                     self.slo_ttft_s))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.loop.submit(request_id, prompt_token_ids, params,
                         lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                         arrival_s if arrival_s is not None else time.monotonic(), validated=True)
        remaining = params.n
        try:
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    remaining = 0
                    raise item
                if item.finished:
                    remaining -= 1
                yield item
        finally:
            if remaining:
                self.loop.abort(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.loop.abort(request_id, index)

    async def unready(self) -> str | None:
        return None if self.loop.alive else "the engine has stopped"

    def _load(self) -> WorkerLoad:
        return WorkerLoad.from_stats(f"{self.role}-0", self.loop.stats(), self.engine_info.block_size)

    async def workers(self) -> list[WorkerView]:
        load = self._load()
        return [WorkerView(load.worker_id, self.role, "", load, self.engine_info.num_kv_blocks)]

    async def control(self) -> dict:
        """Semi-PD: the split and its controller's last decision."""
        return self._control() if self._control is not None else {}
