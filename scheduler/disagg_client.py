"""DisaggClient: the front door's EngineClient over the cluster.

Each request asks the global scheduler for a (prefill, decode) pair, then streams its tokens
from the decode worker over gRPC; the decode worker does the rest (reserve, prefill, KV,
decode). n > 1 runs as n independent requests (`<id>#<i>`, each with its own seed) whose
outputs are merged. No route (no live worker of a role, or no decode worker with room for
the prompt) is a 503 with Retry-After; a decode worker that dies mid-stream fails its own
requests at once and is reported to the scheduler, which stops routing to it.

Engine gauges on /metrics are the decode pool's, from the scheduler's registry (refreshed
at most every `stats_ttl_s`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from engine.decode_role import Overloaded
from engine.engine import EngineStats, StepOutput
from engine.request import validate_request
from engine.sampling_params import SamplingParams
from scheduler.engine_client import EngineClient, ModelInfo
from scheduler.worker_rpc import StreamClient, WorkerFailed


class DisaggClient(EngineClient):
    def __init__(self, scheduler, info: ModelInfo, stats_ttl_s: float = 1.0):
        self.scheduler = scheduler  # the GlobalScheduler actor handle
        self.info = info
        self.streams = StreamClient()
        self.stats_ttl_s = stats_ttl_s
        self._stats = EngineStats(0, 0, 0, 0, 0, 0)
        self._stats_at = 0.0
        self._samples: dict[str, list[asyncio.Task]] = {}  # n > 1: one streaming task per sample

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.info.max_model_len, self.info.vocab_size)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       arrival_s: float | None = None) -> AsyncIterator[StepOutput]:
        self.check(prompt_token_ids, params)
        if params.n == 1:
            async for out in self._one(request_id, prompt_token_ids, params):
                yield out
            return
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for out in self._one(f"{request_id}#{index}", prompt_token_ids, params.for_child(index)):
                    out.request_id, out.index = request_id, index
                    await queue.put(out)
            except Exception as e:
                await queue.put(e)

        tasks = [asyncio.create_task(pump(i)) for i in range(params.n)]
        self._samples[request_id] = tasks
        try:
            remaining = params.n
            while remaining:
                item = await queue.get()
                if isinstance(item, Exception):
                    raise item
                remaining -= item.finished
                yield item
        finally:
            self._samples.pop(request_id, None)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, request_id: str, prompt_token_ids: list[int],
                   params: SamplingParams) -> AsyncIterator[StepOutput]:
        target = await self.scheduler.route.remote(len(prompt_token_ids))
        if target is None:
            raise Overloaded("no decode worker can take this prompt now (all busy or down); retry later")
        try:
            async for out in self.streams.generate(target.decode_id, target.decode_address, target.prefill_id,
                                                   target.prefill_address, request_id, prompt_token_ids, params):
                yield out
        except WorkerFailed as e:
            self.scheduler.report_failure.remote(e.worker_id, target.decode_address)
            await self.streams.forget(target.decode_address)
            raise

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Ends one sample of an n > 1 request (a stop string); a whole request ends when its
        stream is closed, which cancels its call and aborts it on the workers."""
        tasks = self._samples.get(request_id, [])
        if index is not None and index < len(tasks):
            tasks[index].cancel()

    def stats(self) -> EngineStats:
        now = time.monotonic()
        if now - self._stats_at > self.stats_ttl_s:
            self._stats_at = now
            ref = self.scheduler.workers.remote()
            asyncio.get_running_loop().create_task(self._refresh(ref))
        return self._stats

    async def _refresh(self, ref) -> None:
        try:
            workers = [w for w in await ref if w["role"] == "decode" and w["alive"]]
        except Exception:
            return
        total = sum(w["num_total_blocks"] for w in workers)
        self._stats = EngineStats(sum(w["num_running"] for w in workers), sum(w["num_waiting"] for w in workers),
                                  total - sum(w["num_free_blocks"] for w in workers), total, 0, 0)

    async def close(self) -> None:
        await self.streams.close()
