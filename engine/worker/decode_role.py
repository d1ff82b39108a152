"""Decode role: owns each disaggregated request from block reservation to its last token.

`generate()` reserves the prompt's blocks on the engine (between steps). With no room the
request waits in a FIFO, retried after every loop iteration (blocks free up as requests
finish). The bound counts requests that found no room, not arrivals the loop has yet to
try: beyond it a request is refused with Overloaded (HTTP 503, Retry-After), at once when
the waiters alone fill it, else when its own try finds no room.
Once reserved, `start_prefill(request_id, cached_blocks, transfer_id)` asks a prefill worker to
fill the blocks (the KV travelling under the transfer id the reservation named) and
returns a future of the first token; KV chunks arrive through `land()`. The engine admits
the request when both are in, and its tokens (the first included) flow to the sink.
A failed prefill, or KV that made no progress for `transfer_timeout_s`, aborts the request,
which frees its blocks, and fails its sink with the reason. Progress is a chunk landing, or,
when a `probe` is given, the prefill side saying it is still working on the request: a
request queued behind others at a busy prefill worker waits; one at a hung worker fails.
A reservation shares the blocks of a cached prefix of the prompt; the prefill worker is told
to skip them. An engine that allocates within its own step (vLLM's) defers the reservation:
the prefill starts after the step that held the blocks. `generate_local()` prefills on this
worker instead (conditional disaggregation): the request runs as it would colocated.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

from engine.config import WorkerOptions
from engine.errors import EngineError, Overloaded, RequestError
from engine.interface import DEFERRED, WorkerEngine
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from engine.worker.loop import EngineLoop, Sink

if TYPE_CHECKING:
    from engine.transfer.base import LayerChunk

log = logging.getLogger(__name__)

StartPrefill = Callable[[str, int, int], "Future[StepOutput]"]  # (request id, leading blocks cached here, transfer id)
Probe = Callable[[str], bool]  # (request id) -> is its prefill still under way? (may block briefly)


@dataclass
class _Pending:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    start_prefill: StartPrefill
    sink: Sink
    blocked: bool = False  # tried on the loop thread and found no room


class DecodeRole:
    def __init__(self, loop: EngineLoop, options: WorkerOptions = WorkerOptions(), probe: Probe | None = None,
                 ended: Callable[[str], None] = lambda request_id: None):
        """ended(request_id): a request ended (aborted or failed) on this side, whatever its KV's state."""
        self.loop = loop
        self.max_pending = options.max_waiting_for_blocks
        self.transfer_timeout_s = options.transfer_timeout_s
        self.probe, self.ended = probe, ended
        self._pending: deque[_Pending] = deque()  # FIFO: those blocked lead, arrivals follow
        self._lock = threading.Lock()
        self._timers: dict[str, threading.Timer] = {}  # guarded by _timer_lock
        self._timer_lock = threading.Lock()
        self._landed: set[str] = set()  # requests with a chunk landed since their timer was armed
        self._prefills: dict[str, Future] = {}  # first tokens still awaited
        self._deferred: dict[str, tuple[StartPrefill, int]] = {}  # reserved, the engine to allocate in its next step
        self._transfer_ids = itertools.count(1)  # loop thread only: a new one per reservation
        loop.add_hook(self._on_iteration)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 start_prefill: StartPrefill, sink: Sink, validated: bool = False) -> None:
        """Raises RequestError for a bad request (unless validated: the caller checked it) and
        Overloaded when the wait queue is full."""
        if params.n != 1:
            raise RequestError("disaggregated serving supports n=1 only", param="n")
        if not validated:
            self.loop.engine.validate(prompt_token_ids, params, prefills=False)
        with self._lock:
            blocked = self._blocked()
            if blocked and blocked >= self.max_pending:
                raise self._overloaded()
            self._pending.append(_Pending(request_id, prompt_token_ids, params, start_prefill, sink))
        self.loop.call(self._reserve_pending)

    def generate_local(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       sink: Sink) -> None:
        """Prefill and decode here. Raises RequestError for a bad request."""
        self.loop.submit(request_id, prompt_token_ids, params, sink)

    def land(self, chunk: LayerChunk) -> None:
        """A KV chunk from the prefill side (any thread); written between steps."""
        with self._timer_lock:
            if chunk.request_id in self._timers:
                self._landed.add(chunk.request_id)
        self.loop.call(lambda engine: engine.receive_kv(chunk))

    def _overloaded(self) -> Overloaded:
        return Overloaded(f"the decode worker has {self.max_pending} requests waiting for KV blocks; retry later")

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._pending = deque(p for p in self._pending if p.request_id != request_id)
        self._deferred.pop(request_id, None)
        self._cancel_timer(request_id)
        self._cancel_prefill(request_id)
        self.ended(request_id)
        self.loop.abort(request_id)

    @property
    def num_pending(self) -> int:
        """Requests waiting for blocks (those the loop has yet to try not counted)."""
        with self._lock:
            return self._blocked()

    def _blocked(self) -> int:
        """With _lock held."""
        return sum(p.blocked for p in self._pending)

    @property
    def num_deadlines(self) -> int:
        """Requests whose KV is still awaited against the transfer timeout."""
        return len(self._timers)

    def _on_iteration(self, engine: WorkerEngine) -> None:
        with self._timer_lock:
            awaited = list(self._timers)
        for request_id in awaited:  # KV complete (or request gone): no deadline
            if not engine.waiting_for_kv(request_id):
                self._cancel_timer(request_id)
        for request_id, cached_blocks in engine.allocated():
            deferred = self._deferred.pop(request_id, None)
            if deferred is not None:
                self._start(engine, request_id, *deferred, cached_blocks)
        self._reserve_pending(engine)

    def _reserve_pending(self, engine: WorkerEngine) -> None:
        """On the loop thread: reserve for waiting requests in order while blocks allow; then
        the untried arrivals join the waiters, or are refused beyond the bound."""
        while True:
            with self._lock:
                if not self._pending:
                    return
                p = self._pending[0]
                transfer_id = next(self._transfer_ids)
                try:
                    cached_blocks = engine.reserve_prefilled(p.request_id, p.prompt_token_ids, p.params,
                                                             transfer_id=transfer_id)
                except RequestError as e:
                    self._pending.popleft()
                    p.sink(e)
                    continue
                if cached_blocks is None:
                    self._block_arrivals()
                    return
                self._pending.popleft()
            self.loop.attach(p.request_id, p.sink)
            if cached_blocks == DEFERRED:
                self._deferred[p.request_id] = (p.start_prefill, transfer_id)
            else:
                self._start(engine, p.request_id, p.start_prefill, transfer_id, cached_blocks)

    def _start(self, engine: WorkerEngine, request_id: str, start_prefill: StartPrefill, transfer_id: int,
               cached_blocks: int) -> None:
        """On the loop thread, the blocks held: ask a prefill worker for the prompt's KV."""
        self._start_timer(request_id)
        try:
            future = start_prefill(request_id, cached_blocks, transfer_id)
        except Exception as e:
            self._fail(engine, request_id, EngineError(f"prefill could not start: {e}"))
            return
        self._prefills[request_id] = future
        future.add_done_callback(lambda f: self._on_first_token(request_id, f))

    def _block_arrivals(self) -> None:
        """With _lock held, the head found no room: every arrival behind it waits too, or is
        refused when the waiters fill the bound."""
        kept: deque[_Pending] = deque()
        blocked = self._blocked()
        for p in self._pending:
            if not p.blocked:
                if blocked >= self.max_pending:
                    p.sink(self._overloaded())
                    continue
                p.blocked = True
                blocked += 1
            kept.append(p)
        self._pending = kept

    def _on_first_token(self, request_id: str, future: "Future[StepOutput]") -> None:
        self._prefills.pop(request_id, None)
        if future.cancelled():
            return
        error = future.exception()
        if error is not None:
            if not isinstance(error, RequestError):
                error = EngineError(f"prefill failed: {error}")
            self.loop.call(lambda engine: self._fail(engine, request_id, error))
            return
        out = future.result()
        logprob = out.new_logprobs[0] if out.new_logprobs else None
        prefill_s = out.timeline.phases().get("prefill", 0.0) if out.timeline else 0.0
        self.loop.call(lambda engine: engine.give_first_token(request_id, out.new_token_ids[0], logprob, prefill_s)
                       or self.ended(request_id))  # ended meanwhile: say so again, its transfer now named

    def _start_timer(self, request_id: str) -> None:
        with self._timer_lock:
            self._arm(request_id)

    def _arm(self, request_id: str) -> None:
        """With _timer_lock held: (re)starts the request's no-progress timer."""
        self._landed.discard(request_id)
        timer = threading.Timer(self.transfer_timeout_s, self._check, (request_id,))
        timer.daemon = True
        self._timers[request_id] = timer
        timer.start()

    def _check(self, request_id: str) -> None:
        """On the timer's thread: re-arm while the KV progresses, else fail the request."""
        progressed = request_id in self._landed
        if not progressed and self.probe is not None:
            try:
                progressed = self.probe(request_id)
            except Exception as e:  # a probe that fails says nothing is progressing
                log.warning("progress probe for %s failed: %s", request_id, e)
        with self._timer_lock:
            if request_id not in self._timers:
                return  # complete or ended meanwhile
            if progressed:
                self._arm(request_id)
                return
        self.loop.call(lambda engine: self._expire(engine, request_id))

    def _cancel_prefill(self, request_id: str) -> None:
        future = self._prefills.pop(request_id, None)
        if future is not None:
            future.cancel()

    def _cancel_timer(self, request_id: str) -> None:
        with self._timer_lock:
            timer = self._timers.pop(request_id, None)
            self._landed.discard(request_id)
        if timer is not None:
            timer.cancel()

    def _expire(self, engine: WorkerEngine, request_id: str) -> None:
        self._cancel_timer(request_id)
        if engine.waiting_for_kv(request_id):
            self._fail(engine, request_id, EngineError(
                f"the prompt's KV did not arrive: no progress for {self.transfer_timeout_s:g} s"))

    def _fail(self, engine: WorkerEngine, request_id: str, error: Exception) -> None:
        """On the loop thread: end the request, free its blocks, tell its client."""
        self._deferred.pop(request_id, None)
        self._cancel_timer(request_id)
        self._cancel_prefill(request_id)
        self.ended(request_id)
        sink = self.loop.detach(request_id)
        engine.abort(request_id)
        if sink is not None:
            sink(error)
