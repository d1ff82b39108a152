"""Semi-PD: prefill and decode as two concurrent streams of work in one process, over
one copy of the weights and one KV pool (TECHNIQUES.md, semi-PD).

Two engine loops, each on its own thread. The decode engine owns the model, the KV cache
and the block pool; the prefill engine runs a sibling runner (the same weights and KV
tensor) over `LentBlocks`. A request goes:
1. `DecodeRole` reserves its prompt blocks on the decode thread (the decode side owns block
   allocation; a cached prefix is shared, not recomputed);
2. the decode side takes one more reference on those blocks for the prefill stream and
   lends them to it;
3. the prefill stream computes the prompt straight into them under its prefill schedule
   (whole, chunked or layered) and samples the first token;
4. the request joins the decodes with that token: no KV copy. The prefill stream's
   reference is dropped on the decode thread once it is done with the blocks (finished,
   failed or aborted), so blocks of an aborted request are not reused while still written.
Each stream runs on its share of the device (`ComputeSplit`); a `SplitController`, when
given, moves the share every `window` decode iterations from the window's TTFT and TPOT.
Requests with n > 1 run as n requests (ids `id#i`, each its own child seed).
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass, field, replace

from engine.config import EngineConfig, WorkerOptions
from engine.engine import Engine
from engine.errors import EngineError
from engine.kv.lent import LentBlocks
from engine.outputs import EngineStats, StepOutput
from engine.sampling_params import SamplingParams
from engine.split import ComputeSplit
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop, Sink
from engine.worker.prefill_role import first_token
from engine.worker.split_controller import SplitController, SplitDecision, WindowStats

log = logging.getLogger(__name__)


@dataclass
class _Window:
    """Finished requests and prefills since the last decision (guarded by the worker's lock)."""

    start_s: float
    arrivals: int = 0
    ttft_s: list[float] = field(default_factory=list)
    tpot_s: list[float] = field(default_factory=list)
    prefill_full_s: list[float] = field(default_factory=list)  # each prefill's time scaled to the whole device


class SemiPD:
    def __init__(self, config: EngineConfig, prefill_share: float = 50.0,
                 controller: SplitController | None = None, options: WorkerOptions = WorkerOptions()):
        """options.max_waiting_for_blocks: requests queued while the pool has no blocks for
        them; beyond that, Overloaded (503)."""
        if config.kv_predictor:
            raise ValueError("--kv-predictor runs on colocated, prefill and decode workers, not in semi-PD mode")
        self.engine = Engine(config)  # the decode side: owns the weights, the KV cache and the pool
        runner = self.engine.runner
        self.split = ComputeSplit(runner.device, controller.share if controller else prefill_share,
                                  runner.threads if config.tensor_parallel_size > 1 else config.num_threads)
        self.lent = LentBlocks(config.block_size, self._give_back)
        self.prefill_engine = Engine(config, runner.share(self.split, "decode"), self.lent)
        self.decode = EngineLoop(self.engine)
        self.prefill = EngineLoop(self.prefill_engine)
        self.role = DecodeRole(self.decode, options, probe=self._prefilling)
        self.controller = controller
        self._lock = threading.Lock()
        self._window = _Window(time.monotonic())
        self._iterations = 0
        self._children: dict[str, list[str]] = {}  # request id -> its samples' ids, while any runs
        self._finished: dict[str, int] = {}  # samples finished, of requests with n > 1 still running
        if controller is not None:
            self.decode.add_hook(self._control)

    def start(self) -> SemiPD:
        self.decode.start()
        self.prefill.start()
        return self

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, sink: Sink,
               arrival_s: float | None = None, validated: bool = False) -> None:
        """Raises RequestError for a request the engine would refuse (unless validated: the
        caller checked it), Overloaded when too many wait for blocks."""
        if not validated:
            self.engine.validate(prompt_token_ids, params)
        arrival_s = time.monotonic() if arrival_s is None else arrival_s
        ids = [request_id] if params.n == 1 else [f"{request_id}#{i}" for i in range(params.n)]
        with self._lock:
            self._children[request_id] = ids
            self._window.arrivals += 1
        try:
            for i, child_id in enumerate(ids):
                child = params if params.n == 1 else params.for_child(i)
                start = functools.partial(self._start_prefill, prompt_token_ids=prompt_token_ids, params=child)
                self.role.generate(child_id, prompt_token_ids, child, start, self._observed(request_id, i, arrival_s, sink),
                                   validated=True)
        except Exception:
            self.abort(request_id)
            raise

    def abort(self, request_id: str, index: int | None = None) -> None:
        """Ends the request (or its index-th sample) wherever it is; its blocks are freed."""
        with self._lock:
            ids = self._children.get(request_id, [])
            if index is None:
                self._children.pop(request_id, None)
                self._finished.pop(request_id, None)
        for child_id in ids if index is None else ids[index:index + 1]:
            self.role.abort(child_id)

    @property
    def alive(self) -> bool:
        return self.decode.alive and self.prefill.alive

    def stats(self) -> EngineStats:
        d, p = self.decode.stats(), self.prefill.stats()
        return replace(d, num_waiting=d.num_waiting + p.num_waiting + p.num_running + self.role.num_pending,
                       num_pending_prefill_tokens=p.num_pending_prefill_tokens + d.num_pending_prefill_tokens,
                       weight_bytes_dense=d.weight_bytes_dense + p.weight_bytes_dense,
                       weight_bytes_expert=d.weight_bytes_expert + p.weight_bytes_expert)

    def control(self) -> dict:
        """The split and the controller's last decision, for /metrics."""
        out: dict = {"prefill_share": self.split.prefill_share}
        if self.controller is not None:
            d = self.controller.last
            out.update(verdict=d.verdict, ttft_s=d.ttft_s, tpot_s=d.tpot_s)
        return out

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self.prefill.shutdown(timeout_s)  # first: its aborts give blocks back to the decode side
        self.decode.shutdown(timeout_s)

    # the decode thread's side

    def _start_prefill(self, request_id: str, cached_blocks: int, transfer_id: int, prompt_token_ids: list[int],
                       params: SamplingParams):
        """DecodeRole's hook, on the decode thread: lend the reserved blocks, start the prefill
        (into them: no transfer, whatever its id)."""
        blocks = self.engine.lend_blocks(request_id)  # the prefill stream's reference
        self.lent.lend(request_id, blocks, cached_blocks)
        try:
            future = first_token(self.prefill, request_id, prompt_token_ids, params, validated=True)
        except Exception:
            self.lent.cancel(request_id)
            raise
        future.add_done_callback(lambda f: self._prefilled(request_id, f))  # before DecodeRole's callback
        return future

    def _prefilled(self, request_id: str, future) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        self.decode.call(lambda engine: engine.kv_written(request_id))
        timeline = future.result().timeline
        if timeline is not None:
            prefill_s = timeline.phases().get("prefill")
            if prefill_s is not None:
                with self._lock:
                    self._window.prefill_full_s.append(prefill_s * self.split.prefill_share / 100)

    def _give_back(self, blocks: list[int]) -> None:
        """The prefill stream is done with these blocks: drop its reference (decode thread)."""
        try:
            self.decode.call(lambda engine: engine.kv.pool.release(blocks))
        except EngineError:
            pass  # shutting down: the pool goes with the process

    def _prefilling(self, request_id: str) -> bool:
        return self.prefill_engine.has_request(request_id)

    def _observed(self, request_id: str, index: int, arrival_s: float, sink: Sink) -> Sink:
        """The client's sink, with the request's TTFT and TPOT recorded for the controller."""
        first_s: list[float] = []
        count = [0]

        def observe(out: StepOutput | Exception) -> None:
            if isinstance(out, Exception):  # the other samples end too (later: DecodeRole's lock may be held)
                try:
                    self.decode.call(lambda _: self.abort(request_id))
                except EngineError:
                    pass
            else:
                now = time.monotonic()
                if not first_s:
                    first_s.append(now)
                count[0] += len(out.new_token_ids)
                if out.finished:
                    with self._lock:
                        self._ended(request_id)
                        self._window.ttft_s.append(first_s[0] - arrival_s)
                        if count[0] > 1:
                            self._window.tpot_s.append((now - first_s[0]) / (count[0] - 1))
                out = replace(out, request_id=request_id, index=index)
            sink(out)
        return observe

    def _ended(self, request_id: str) -> None:
        """With the lock held: one sample of the request finished."""
        ids = self._children.get(request_id)
        if ids is not None:
            self._finished[request_id] = done = self._finished.get(request_id, 0) + 1
            if done == len(ids):
                self._children.pop(request_id)
                self._finished.pop(request_id)

    def _control(self, engine: Engine) -> None:
        """Decode-thread hook: every `window` iterations, a decision on the split."""
        assert self.controller is not None
        self._iterations += 1
        if self._iterations % self.controller.config.window:
            return
        now = time.monotonic()
        with self._lock:
            w, self._window = self._window, _Window(now)
        full = w.prefill_full_s or [0.0]
        decision: SplitDecision = self.controller.update(
            WindowStats(w.ttft_s, w.tpot_s, w.arrivals / max(now - w.start_s, 1e-9), sum(full) / len(full)))
        if decision.share != self.split.prefill_share:
            log.info("semi-PD controller: %s, prefill share %.0f%% -> %.0f%% (p%d TTFT %.3f s, TPOT %s)",
                     decision.verdict, self.split.prefill_share, decision.share,
                     round(self.controller.config.quantile * 100), decision.ttft_s,
                     f"{decision.tpot_s:.3f} s" if decision.tpot_s is not None else "-")
            self.split.set_share(decision.share)
