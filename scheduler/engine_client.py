"""EngineClient: how the front door talks to an engine, whatever carries the calls.

`generate` yields a request's StepOutputs until all its samples finish; leaving the
iterator early (client gone, stop string) aborts what is left. `InProcessClient` drives
an EngineWorker in this process (colocated mode, tests), or a SemiPDWorker (semi-PD mode).
"""

from __future__ import annotations

import abc
import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from engine.engine import StepOutput
from engine.sampling_params import SamplingParams
from engine.semi_pd import SemiPDWorker
from engine.worker import EngineWorker
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
        """Every engine worker behind this client with its current load (for /metrics)."""

    async def control(self) -> dict:
        """Routing decisions for /metrics: the role controller's last verdict and moves, workers
        lent by the mixed pool, prefills run on decode workers (empty when colocated)."""
        return {}

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raises RequestError for a request the engine would refuse (before any response starts)."""


class InProcessClient(EngineClient):
    def __init__(self, worker: EngineWorker | SemiPDWorker, name: str, slo_ttft_s: float | None = None):
        """slo_ttft_s: a request that leaves kv_prediction unset is prefilled from the KV
        predictor (if the engine has one) when full prefill would miss it (use_kv_prediction)."""
        self.worker, self.slo_ttft_s = worker, slo_ttft_s
        engine = worker.engine
        self.info = ModelInfo(name, engine.max_model_len, engine.model_config.vocab_size)
        self.role = "semi-pd" if isinstance(worker, SemiPDWorker) else "colocated"

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.worker.engine.validate(prompt_token_ids, params)

    async def generate(self, request_id, prompt_token_ids, params, arrival_s=None):
        if params.kv_prediction is None and params.n == 1 and self.slo_ttft_s is not None \
                and self.worker.engine.kv_predictor is not None:  # no predictor: no stats read per request
            params = replace(params, kv_prediction=use_kv_prediction(self._load(), len(prompt_token_ids),
                                                                     self.slo_ttft_s))
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        self.worker.submit(request_id, prompt_token_ids, params,
                           lambda item: loop.call_soon_threadsafe(queue.put_nowait, item),
                           arrival_s if arrival_s is not None else time.monotonic())
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
                self.worker.abort(request_id)

    def abort(self, request_id: str, index: int | None = None) -> None:
        self.worker.abort(request_id, index)

    def _load(self) -> WorkerLoad:
        stats = self.worker.stats()
        free = stats.num_kv_blocks_total - stats.num_kv_blocks_used
        return WorkerLoad(f"{self.role}-0", stats.num_pending_prefill_tokens, stats.num_running, stats.num_waiting,
                          free, self.worker.engine.config.block_size, weight_bytes_dense=stats.weight_bytes_dense,
                          weight_bytes_expert=stats.weight_bytes_expert, prefill_s_per_token=stats.prefill_s_per_token,
                          kv_prediction_cost=stats.kv_prediction_cost,
                          num_predicted_prefills=stats.num_predicted_prefills)

    async def workers(self) -> list[WorkerView]:
        load = self._load()
        return [WorkerView(load.worker_id, self.role, "", load, self.worker.engine.num_kv_blocks)]

    async def control(self) -> dict:
        """Semi-PD: the split and its controller's last decision."""
        return self.worker.control() if isinstance(self.worker, SemiPDWorker) else {}
