"""Discrete-event simulator of pdserve serving: the live batcher and router, timed by a profile.

Each simulated worker holds the engine's own `Batcher` over its own `KVCacheManager`
(engine/batcher.py, engine/kv/manager.py: no torch) and steps whenever it has work; a step
lasts what the profile's latency model says for its plan (LatencyModel.step_s). Disaggregated
requests follow the live lifecycle: the front door routes with the live `Router` and policy
over the workers' loads; the decode worker reserves the prompt's blocks (FIFO wait when it
has none); the prefill worker computes the prompt as a one-token request; its KV lands
`transfer_s(prompt)` after the prefill step ends (what layer-wise transfer leaves exposed);
the decode worker emits the first token at its next step boundary and decodes the rest.
A route without a prefill worker (conditional disaggregation, or the mixed pool with nothing
to borrow) prefills on the decode worker, in its batcher, as colocated serving does; a worker
lent to the other pool runs both kinds of work. Colocated workers prefill and decode in one
batcher; a request goes to the one with the fewest pending prompt tokens. Workers prefill
under the configured schedule (whole, chunked, layered): a layered cohort's step costs its
share of the layers (LatencyModel.step_s). (The role
controller is not simulated.) The result is bench's RequestRecords,
so `bench.metrics.summarize` reports simulated and measured runs the same way.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from bench.metrics import RequestRecord
from engine.batcher import Batcher, StepPlan
from engine.config import DEFAULT_BLOCK_SIZE, EngineConfig, PrefillSchedule
from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams
from scheduler.planner.latency import LatencyModel
from scheduler.policies import DEFAULT_POLICY, PolicyConfig, WorkerLoad
from scheduler.router import Router, WorkerView


@dataclass(frozen=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


@dataclass(frozen=True)
class StopEarly:
    """Stop a run as soon as its verdict is certain: whether at least `attainment` of all
    requests meet both SLOs (judged as bench.metrics.SLO judges them: the first token within
    ttft_ms of arrival, the mean time per output token within tpot_ms; no route misses) and
    the run keeps pace (`keeps_pace(records)`, judged once the clock passes `pace_known_s`,
    when every token it counts has been emitted). It fails once the misses leave fewer than
    the target to meet it; it passes once the pace is kept and enough have met them."""
    ttft_ms: float
    tpot_ms: float
    attainment: float
    keeps_pace: Callable[[list[RequestRecord]], bool] | None = None
    pace_known_s: float = 0.0


@dataclass(frozen=True)
class SimConfig:
    num_prefill: int = 1
    num_decode: int = 1  # with colocated: the number of colocated workers
    colocated: bool = False
    policy: str = DEFAULT_POLICY
    num_blocks: int = 4096  # KV blocks per worker
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = EngineConfig.max_num_seqs
    max_num_batched_tokens: int = EngineConfig.max_num_batched_tokens
    prefill_schedule: PrefillSchedule = PrefillSchedule.CHUNKED  # as the engine's --prefill-schedule
    token_budget: int | None = None    # chunked: tokens per step (default max_num_batched_tokens)
    num_layers: int = 32               # layered: the model's layers, which the cohort's groups divide
    transfer_s_per_token: float = 0.0  # exposed KV transfer after the prefill step, per prompt token
    max_model_len: int = 1 << 20
    policy_config: PolicyConfig = PolicyConfig()


class _Worker:
    def __init__(self, worker_id: str, role: str, config: SimConfig):
        self.worker_id, self.role, self.config = worker_id, role, config
        self.kv = KVCacheManager(config.num_blocks, config.block_size, enable_prefix_caching=False)
        self.batcher = Batcher(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_schedule,
                               config.token_budget, config.num_layers)
        self.busy_until: float | None = None  # end of the step in progress
        self.waiting_for_blocks: deque[tuple[Request, _Worker]] = deque()  # decode: (request, its prefill worker)
        self.ready: list[Request] = []  # decode: KV landed, first token goes out at the next step boundary
        self.wake_pending = False

    def view(self) -> WorkerView:
        """The load a live worker would report to the scheduler."""
        config = self.config
        load = WorkerLoad(self.worker_id, self.batcher.num_pending_prefill_tokens, len(self.batcher.running),
                          len(self.batcher.waiting) + len(self.waiting_for_blocks), self.kv.num_free_blocks,
                          config.block_size)
        return WorkerView(self.worker_id, self.role, self.worker_id, load, config.num_blocks)


class Simulator:
    def __init__(self, latency: LatencyModel, config: SimConfig = SimConfig()):
        self.latency, self.config = latency, config
        if config.colocated:
            self.workers = [_Worker(f"colocated-{i}", "colocated", config) for i in range(config.num_decode)]
        else:
            self.workers = ([_Worker(f"prefill-{i}", "prefill", config) for i in range(config.num_prefill)]
                            + [_Worker(f"decode-{i}", "decode", config) for i in range(config.num_decode)])
        self.router = Router(config.policy, config.policy_config)
        self._events: list = []
        self._order = itertools.count()
        self.now = 0.0
        self.num_events = 0
        self._params_by_len: dict[int, SamplingParams] = {}

    def run(self, requests: list[SimRequest], stop: StopEarly | None = None) -> list[RequestRecord]:
        """Each request's record; with stop, the run may end once its verdict is certain
        (`verdict`: True passed, False failed, None ran to the end), its records then unfinished."""
        records = [RequestRecord(send_s=r.arrival_s, prompt_tokens=r.prompt_len, index=i)
                   for i, r in enumerate(requests)]
        self.records = records
        self._records = {str(i): record for i, record in enumerate(records)}
        self._output_len = {str(i): r.output_len for i, r in enumerate(requests)}
        self._decode_side: dict[str, tuple[Request, Request, _Worker]] = {}  # id -> (prefill twin, request, decode)
        self._stop, self._missed_ids, self.verdict = stop, set(), None
        self.num_met = 0  # with stop: requests that have met both SLOs so far
        self._pace_kept = stop is not None and stop.keeps_pace is None
        pace_at = stop.pace_known_s if stop is not None and stop.keeps_pace is not None else math.inf
        for i, r in enumerate(requests):
            self._at(r.arrival_s, self._arrive, i, r)
        events = self._events
        while events:
            self.now, _, fn, args = heapq.heappop(events)
            if self.now > pace_at:
                pace_at = math.inf
                if not stop.keeps_pace(records):
                    self._decide(False)
                    break
                self._pace_kept = True
                self._check_met()
                if self.verdict is not None:
                    break
            self.num_events += 1
            fn(*args)
        if self.verdict is None:
            for w in self.workers:
                assert not w.batcher.num_unfinished and not w.kv.num_used_blocks, f"{w.worker_id} did not drain"
        return records

    def _decide(self, verdict: bool) -> None:
        self.verdict = verdict
        self._events.clear()

    def _missed(self, request_id: str) -> None:
        self._missed_ids.add(request_id)
        num = len(self._records)
        if (num - len(self._missed_ids)) / num < self._stop.attainment:
            self._decide(False)

    def _check_met(self) -> None:
        if self._pace_kept and self.num_met / len(self._records) >= self._stop.attainment:
            self._decide(True)

    # events

    def _params(self, max_tokens: int) -> SamplingParams:
        """Greedy, EOS ignored: every request runs to its output length (made once per length)."""
        params = self._params_by_len.get(max_tokens)
        if params is None:
            params = self._params_by_len[max_tokens] = SamplingParams(max_tokens=max_tokens, ignore_eos=True,
                                                                      temperature=0.0)
        return params

    def _at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._order), fn, args))

    def _arrive(self, index: int, r: SimRequest) -> None:
        record = self._records[str(index)]
        params = self._params(r.output_len)
        prompt = [index] + [0] * (r.prompt_len - 1)  # no two prompts share a prefix
        request = Request(str(index), prompt, params, (), self.config.max_model_len)
        if self.config.colocated:
            worker = min(self.workers, key=lambda w: (w.view().load.pending_prefill_tokens,
                                                      len(w.batcher.running), w.worker_id))
            worker.batcher.add(request)
            self._kick(worker)
            return
        self.router.update([w.view() for w in self.workers])
        target = self.router.route(r.prompt_len, prompt)
        if target is None:
            record.ok, record.error = False, "no route"
            if self._stop:
                self._missed(str(index))
            return
        by_id = {w.worker_id: w for w in self.workers}
        decode = by_id[target.decode_id]
        if target.local:
            decode.batcher.add(request)
            self._kick(decode)
            return
        decode.waiting_for_blocks.append((request, by_id[target.prefill_id]))
        self._reserve(decode)

    def _reserve(self, decode: _Worker) -> None:
        """FIFO: the decode worker reserves blocks for waiting prompts, then their prefill starts."""
        while decode.waiting_for_blocks:
            request, prefill = decode.waiting_for_blocks[0]
            if not decode.kv.reserve(request, request.num_prompt_tokens):
                return
            decode.waiting_for_blocks.popleft()
            request.status = RequestStatus.WAITING_FOR_KV
            twin = Request(request.request_id, request.prompt_token_ids, self._params(1), (), self.config.max_model_len)
            self._decode_side[twin.request_id] = (twin, request, decode)
            prefill.batcher.add(twin)
            self._kick(prefill)

    def _kick(self, worker: _Worker) -> None:
        """The worker's loop looks for work once everything happening at this instant has
        happened (arrivals at the same time are batched together, as the live loop would)."""
        if worker.busy_until is None and not worker.wake_pending:
            worker.wake_pending = True
            self._at(self.now, self._step, worker)

    def _step(self, worker: _Worker) -> None:
        worker.wake_pending = False
        if worker.busy_until is not None:
            return
        if worker.ready:  # first tokens of landed requests go out before the next forward
            for request in worker.ready:
                self._emit(request)
                status = request.append_token(1)
                if status is not None:
                    self._finish(worker, request, status)
                else:
                    worker.batcher.add_running(request)
            worker.ready = []
        plan = worker.batcher.schedule()
        if not plan.seqs and plan.cohort is None:
            return
        chunks, contexts = [], []
        for s in plan.seqs:
            start = s.request.num_computed_tokens
            if start < len(s.request.prompt_token_ids):
                chunks.append((start, s.num_new_tokens))
            else:
                contexts.append(start + 1)
        cohort, layers = [], 0.0
        if plan.cohort is not None:
            cohort = [(s.start, s.num_new_tokens) for s in plan.cohort.seqs]
            layers = (plan.cohort.layer_end - plan.cohort.layer_start) / self.config.num_layers
        worker.busy_until = self.now + self.latency.step_s(chunks, contexts, cohort, layers)
        self._at(worker.busy_until, self._step_done, worker, plan)

    def _step_done(self, worker: _Worker, plan: StepPlan) -> None:
        worker.busy_until = None
        done = plan.done
        sampling = [seq.request for seq in done if seq.samples]  # before the counts move, as in Engine.step
        for seq in done:
            seq.request.num_computed_tokens += seq.num_new_tokens
        decode_side = self._decode_side
        for request in sampling:
            status = request.append_token(1)
            twin, decode_request, decode = decode_side.get(request.request_id) or (None, None, None)
            if twin is request:  # a prefill for another worker's decode
                del decode_side[request.request_id]
                self._finish(worker, request, status)
                self._at(self.now + self.config.transfer_s_per_token * request.num_prompt_tokens,
                         self._landed, decode, decode_request)
                continue
            self._emit(request)
            if status is not None:
                self._finish(worker, request, status)
        self._reserve(worker)
        self._kick(worker)

    def _landed(self, decode: _Worker, request: Request) -> None:
        request.num_computed_tokens = request.num_prompt_tokens
        decode.ready.append(request)
        self._kick(decode)

    def _emit(self, request: Request) -> None:
        record = self._records[request.request_id]
        record.chunk_s.append(self.now)
        record.output_tokens += 1
        stop = self._stop
        if stop is None:
            return
        rid, n = request.request_id, record.output_tokens
        if n == 1 and (self.now - record.send_s) * 1000 > stop.ttft_ms:
            self._missed(rid)
        elif n == self._output_len[rid] and rid not in self._missed_ids:
            ttft = record.chunk_s[0] - record.send_s
            if n > 1 and ((self.now - record.send_s) - ttft) / (n - 1) * 1000 > stop.tpot_ms:
                self._missed(rid)
            else:
                self.num_met += 1
                self._check_met()

    def _finish(self, worker: _Worker, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.WAITING_FOR_KV:  # admitted from a landing, never batched
            worker.kv.free(request)
            request.status = status
        else:
            worker.batcher.finish(request, status)
