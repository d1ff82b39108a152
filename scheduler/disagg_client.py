"""DisaggClient: the front door's EngineClient over the cluster.

Each request is routed to a (prefill, decode) pair on a replica of the global scheduler's
view (scheduler/router.py), refreshed in the background when older than `refresh_s` and
awaited first when older than `stale_s` (after an idle spell), then
streams its tokens from the decode worker over gRPC; the decode worker does the rest (reserve, prefill, KV,
decode). n > 1 runs as n independent requests (`<id>#<i>`, each with its own seed) whose
outputs are merged. No route (no live worker of a role, or no decode worker with room for
the prompt) is a 503 with Retry-After naming which; a decode worker that dies mid-stream fails
its own requests at once and is reported to the scheduler, which stops routing to it. While
requests stream, the view is pulled every `WATCH_S`: the requests of a decode worker the
scheduler has marked down (hung: it missed its load polls) fail then, not when it answers.

Worker gauges on /metrics come from the same view, pulled fresh for each scrape. The
TTFT and TPOT of every finished request go to the scheduler with the next refresh (its role
controller reads them).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace

from engine.errors import Overloaded, RequestError
from engine.outputs import StepOutput
from engine.request import validate_request
from engine.sampling_params import SamplingParams
from scheduler.aio import until
from scheduler.engine_client import EngineClient, ModelInfo
from scheduler.policies import DEFAULT_POLICY, PolicyConfig, use_kv_prediction
from scheduler.router import Router, WorkerView
from scheduler.worker_rpc import StreamClient, WorkerFailed

WATCH_S = 0.5  # while requests stream: how often the front door looks for workers marked down


class DisaggClient(EngineClient):
    def __init__(self, scheduler, info: ModelInfo, policy: str = DEFAULT_POLICY, refresh_s: float = 0.02,
                 stale_s: float = 0.5, policy_config: PolicyConfig = PolicyConfig(),
                 slo_ttft_s: float | None = None):
        """slo_ttft_s: a request that leaves kv_prediction unset is prefilled from its prefill
        worker's KV predictor (if it has one) when full prefill there would miss it."""
        self.scheduler = scheduler  # the GlobalScheduler actor handle
        self.slo_ttft_s = slo_ttft_s
        self.info = info
        self.router = Router(policy, policy_config)
        self._latencies: list[tuple[float, float | None]] = []  # finished since the last refresh
        self.refresh_s, self.stale_s = refresh_s, stale_s
        self.streams = StreamClient()
        self._refreshed_at = 0.0
        self._refresh: asyncio.Task | None = None
        self._reported: dict[str, int] = {}  # routes already counted at the scheduler
        self._samples: dict[str, list[asyncio.Task]] = {}  # n > 1: one streaming task per sample
        self._streaming: dict[str, set[asyncio.Event]] = {}  # decode worker -> set when it is marked down
        self._watchdog: asyncio.Task | None = None

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_token_ids, params, self.info.max_model_len, self.info.vocab_size)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       arrival_s: float | None = None) -> AsyncIterator[StepOutput]:
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
        await self._refresh_view()
        loads = {w: v.load for w, v in self.router.views.items()}  # before this route is charged to them
        target = self.router.route(len(prompt_token_ids), prompt_token_ids, local=params.prompt_logprobs is not None)
        if target is None:
            raise Overloaded(f"{self.router.why_no_route()}; retry later")
        prefiller = loads[target.prefill_id or target.decode_id]
        if params.kv_prediction and prefiller.kv_prediction_cost <= 0:
            raise RequestError("kv_prediction: the workers have no KV predictor (start them with --kv-predictor DIR)",
                               param="kv_prediction")
        if params.kv_prediction is None and self.slo_ttft_s is not None:
            params = replace(params, kv_prediction=use_kv_prediction(prefiller, len(prompt_token_ids), self.slo_ttft_s))
        sent_s, first_s, tokens = time.monotonic(), None, 0
        down = asyncio.Event()
        self._streaming.setdefault(target.decode_id, set()).add(down)
        if self._watchdog is None or self._watchdog.done():
            self._watchdog = asyncio.create_task(self._watch())
        stream = self.streams.generate(target.decode_id, target.decode_address, target.prefill_id,
                                       target.prefill_address, request_id, prompt_token_ids, params)

        def marked_down() -> WorkerFailed:
            return WorkerFailed(target.decode_id, f"decode worker {target.decode_id} stopped answering and was "
                                                  "marked down; the request was ended")
        try:
            async for out in until(stream, down, marked_down):
                first_s = first_s or time.monotonic()
                tokens += len(out.new_token_ids)
                if out.finished:
                    end_s = time.monotonic()
                    tpot = (end_s - first_s) / (tokens - 1) if tokens > 1 else None
                    self._latencies.append((first_s - sent_s, tpot))
                yield out
        except WorkerFailed as e:
            self.router.set_alive(e.worker_id, False)
            self.scheduler.report_failure.remote(e.worker_id, target.decode_address)
            await self.streams.forget(target.decode_address)
            raise
        finally:
            watchers = self._streaming.get(target.decode_id, set())
            watchers.discard(down)
            if not watchers:
                self._streaming.pop(target.decode_id, None)

    async def _watch(self) -> None:
        """While requests stream: pulls the view and ends the requests of workers marked down."""
        while self._streaming:
            await asyncio.sleep(WATCH_S)
            try:
                await self._pull()
            except Exception:  # the scheduler briefly unreachable: look again next time
                continue
            for worker_id, watchers in list(self._streaming.items()):
                view = self.router.views.get(worker_id)
                if view is None or not view.load.alive:
                    for down in watchers:
                        down.set()

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Ends one sample of an n > 1 request (a stop string); a whole request ends when its
        stream is closed, which cancels its call and aborts it on the workers."""
        tasks = self._samples.get(request_id, [])
        if index is not None and index < len(tasks):
            tasks[index].cancel()

    async def workers(self) -> list[WorkerView]:
        """The scheduler's view, fresh (no routing charges), dead workers included."""
        if time.monotonic() - self._refreshed_at > self.refresh_s:
            await self._pull()
        return list(self.router.views.values())

    async def _refresh_view(self) -> None:
        """Starts a refresh when the view is older than refresh_s; waits for it only when the
        view is missing or stale (older than stale_s: the front door sat idle meanwhile)."""
        age = time.monotonic() - self._refreshed_at
        if age > self.refresh_s and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._pull())
        if age > self.stale_s and self._refresh is not None:
            await asyncio.shield(self._refresh)

    async def control(self) -> dict:
        status = await self.scheduler.control_status.remote()
        return dict(status, lent=self.router.lent, local_prefills=self.router.num_local)

    async def _pull(self) -> None:
        routed = dict(self.router.num_routed)
        delta = {w: n - self._reported.get(w, 0) for w, n in routed.items() if n > self._reported.get(w, 0)}
        if delta:
            self.scheduler.count_routes.remote(delta)
            self._reported = routed
        if self._latencies:
            self.scheduler.report_latencies.remote(self._latencies)
            self._latencies = []
        try:
            self.router.update(await self.scheduler.snapshot.remote())
        finally:
            self._refreshed_at = time.monotonic()

    async def close(self) -> None:
        await self.streams.close()
