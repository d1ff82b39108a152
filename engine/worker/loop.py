"""The engine loop: one engine driven by its own thread.

Lifecycle: `start()` launches the loop thread; callers `submit` and `abort` from any
thread, and `call` runs a function on the engine between steps (how disaggregated roles
reserve blocks, land KV chunks and admit prefilled requests without locking the engine).
The loop applies queued calls, adds and aborts, runs one engine step and hands each
output to the request's sink; with no work it sleeps on a condition (never spins).
A request whose own part of a step fails (its sampling set-up) is ended alone with the
error; a step that fails as a whole fails every request in flight and frees their blocks;
either way the loop keeps serving. `shutdown()` fails what is left and joins the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine.errors import EngineError, RequestError, failure
from engine.interface import WorkerEngine
from engine.outputs import EngineStats, StepOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)

Sink = Callable[["StepOutput | Exception"], None]


@dataclass
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float | None
    sink: Sink


class EngineLoop:
    def __init__(self, engine: WorkerEngine):
        self.engine = engine
        self._cond = threading.Condition()
        self._adds: list[_Add] = []
        self._aborts: list[tuple[str, int | None]] = []
        self._calls: list[tuple[Callable[[WorkerEngine], object], Future]] = []
        self._hooks: list[Callable[[WorkerEngine], None]] = []
        self._sinks: dict[str, Sink] = {}
        self._stopped = False
        self._stats = engine.stats()
        self.num_iterations = 0  # loop passes that ran a step: advances while there is work
        self._thread = threading.Thread(target=self._run, name="pdserve-engine", daemon=True)

    def start(self) -> "EngineLoop":
        self._thread.start()
        return self

    def submit(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
               sink: Sink, arrival_s: float | None = None, validated: bool = False) -> None:
        """Queues a request; raises RequestError at once for one the engine would refuse
        (validated: the caller has checked it already, where it entered this process)."""
        if not validated:
            self.engine.validate(prompt_token_ids, params)
        with self._cond:
            if self._stopped:
                raise EngineError("the engine is shutting down")
            self._adds.append(_Add(request_id, prompt_token_ids, params, arrival_s, sink))
            self._cond.notify()

    def call(self, fn: Callable[[WorkerEngine], object]) -> Future:
        """Runs fn(engine) on the loop thread before the next step; the future holds its result
        or exception."""
        future: Future = Future()
        with self._cond:
            if self._stopped:
                raise EngineError("the engine is shutting down")
            self._calls.append((fn, future))
            self._cond.notify()
        return future

    def add_hook(self, fn: Callable[[WorkerEngine], None]) -> None:
        """Runs fn(engine) on the loop thread after every iteration (e.g. to retry reservations
        once blocks have been freed), from the next iteration on."""
        with self._cond:
            self._hooks = [*self._hooks, fn]  # a new list: the loop iterates the one it read

    def remove_hook(self, fn: Callable[[WorkerEngine], None]) -> None:
        with self._cond:
            self._hooks = [h for h in self._hooks if h is not fn]

    def attach(self, request_id: str, sink: Sink) -> None:
        """Sends a request's outputs to sink (for a request entered through `call`); only on
        the loop thread, i.e. from inside a `call`."""
        self._sinks[request_id] = sink

    def detach(self, request_id: str) -> Sink | None:
        """Stops sending a request's outputs; returns its sink (loop thread only)."""
        return self._sinks.pop(request_id, None)

    def abort(self, request_id: str, index: int | None = None) -> None:
        with self._cond:
            self._aborts.append((request_id, index))
            self._cond.notify()

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def alive(self) -> bool:
        """Whether the loop still takes requests."""
        return self._thread.is_alive() and not self._stopped

    def shutdown(self, timeout_s: float = 10.0) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._adds or self._aborts or self._calls or self._stopped or self.engine.has_work()):
                    self._cond.wait()
                calls, self._calls = self._calls, []
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
                stopped = self._stopped
            for fn, future in calls:
                try:
                    future.set_result(fn(self.engine))
                except Exception as e:  # the caller's problem, delivered to the caller
                    future.set_exception(e)
            for add in adds:
                try:
                    self.engine.add_request(add.request_id, add.prompt_token_ids, add.params, add.arrival_s,
                                            validated=True)
                    self._sinks[add.request_id] = add.sink
                except RequestError as e:
                    add.sink(e)
                except Exception as e:  # a bug met by this request alone: it fails, the loop goes on
                    log.exception("adding request %s failed", add.request_id)
                    add.sink(EngineError(f"the engine could not start the request: {type(e).__name__}: {e}"))
            for request_id, index in aborts:
                self.engine.abort(request_id, index)
                if not self.engine.has_request(request_id):
                    self._sinks.pop(request_id, None)
            if stopped:
                self._fail_all(EngineError("the engine shut down"))
                self.engine.close()
                return
            try:
                outputs = self.engine.step()
            except Exception as e:  # one bad step must not take the server down
                log.exception("engine step failed")
                self._fail_all(EngineError(f"engine step failed: {e}"))
                continue
            for out in outputs:
                sink = self._sinks.get(out.request_id)
                if sink is None:
                    continue
                if out.error is not None:  # this request alone failed in the step: all its samples end
                    self.engine.abort(out.request_id)
                    self._sinks.pop(out.request_id, None)
                    sink(failure(out.error, out.error_status))
                else:
                    sink(out)
            for out in outputs:  # only once every sample's output of the step is out
                if not self.engine.has_request(out.request_id):
                    self._sinks.pop(out.request_id, None)
            self._stats = self.engine.stats()  # before the hooks: what they start sees this step's engine
            for hook in self._hooks:  # this iteration's list, whatever is added meanwhile
                hook(self.engine)
            self.num_iterations += 1

    def _fail_all(self, error: Exception) -> None:
        for request_id, sink in list(self._sinks.items()):
            self.engine.abort(request_id)
            sink(error)
        self._sinks.clear()
        self._stats = self.engine.stats()
