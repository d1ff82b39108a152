"""The goodput searches of `pdserve plan`, side by side in processes.

A search finds the highest rate one instance of a kind (prefill, decode, colocated under a
schedule) carries within the SLOs, by bisection over simulations (Planner.max_rate). The
searches that do not depend on each other run at once, one per process of a pool of `jobs`
(prefill over each KV link and colocated under each schedule first, then decode, which is
fed at the prefill goodput). Each search is deterministic (seeded arrivals and lengths), so
the plan is the same with 1 job or many. Every simulation counts once in a counter shared
with the parent, which shows progress.
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scheduler.planner.plan import Planner

POLL_S = 0.1


@dataclass(frozen=True)
class Search:
    kind: str                      # prefill, decode, colocated
    gbps: float | None = None      # the KV link (prefill, decode)
    schedule: str = "chunked"      # colocated: the prefill schedule
    prefill_goodput: float = 0.0   # decode: the rate the prefill side carries

    @property
    def label(self) -> str:
        if self.kind == "colocated":
            return f"colocated ({self.schedule})"
        return self.kind if self.gbps is None else f"{self.kind} (KV at {self.gbps:g} Gb/s)"


Progress = Callable[[int, int, int], None]  # (simulations so far, searches done, searches in all)

_planner: Planner | None = None
_counter = None


def _init(planner: Planner, counter) -> None:
    global _planner, _counter
    _planner, _counter = planner, counter


def _run(search: Search) -> float:
    assert _planner is not None
    return _planner.search(search, _count)


def _count() -> None:
    with _counter.get_lock():
        _counter.value += 1


class Searches:
    """Runs batches of searches for one planner: in this process (jobs=1) or in a pool."""

    def __init__(self, planner: Planner, jobs: int, progress: Progress | None = None):
        self.planner, self.jobs, self.progress = planner, max(1, jobs), progress
        self.num_simulations = 0
        self._done = self._total = 0  # searches, over every run
        self._pool: ProcessPoolExecutor | None = None
        self._counter = None
        if self.jobs > 1:
            ctx = multiprocessing.get_context("fork")  # the children start with the planner, no re-import
            self._counter = ctx.Value("q", 0)
            self._pool = ProcessPoolExecutor(self.jobs, ctx, initializer=_init, initargs=(planner, self._counter))

    def run(self, searches: Sequence[Search]) -> list[float]:
        """Each search's goodput, in order."""
        self._total += len(searches)
        if self._pool is None:
            out = []
            for s in searches:
                out.append(self.planner.search(s, self._tick))
                self._done += 1
            return out
        futures: list[Future] = [self._pool.submit(_run, s) for s in searches]
        while True:
            done = sum(f.done() for f in futures)
            self.num_simulations = self._counter.value
            if self.progress:
                self.progress(self.num_simulations, self._done + done, self._total)
            if done == len(futures):
                self._done += done
                return [f.result() for f in futures]
            time.sleep(POLL_S)

    def _tick(self) -> None:
        self.num_simulations += 1
        if self.progress:
            self.progress(self.num_simulations, self._done, self._total)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def __enter__(self) -> Searches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
