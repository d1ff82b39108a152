"""The goodput searches of `pdserve plan`, side by side in processes.

A search finds the highest rate one instance of a kind (prefill, decode, colocated under a
schedule) carries within the SLOs, by bisection over simulations (Planner.max_rate). Searches
run as soon as what they depend on is known, one per process of a pool of `jobs`, decode
first (the longest), then prefill, then colocated: a decode search is fed at its link's
prefill goodput, and a slower link's search is capped by the fastest link's result. Each
search is deterministic (seeded arrivals and lengths, inputs from deterministic searches),
so the plan is the same with 1 job or many. Every simulation counts once in a counter shared
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
    cap: float | None = None       # the goodput is known not to exceed this (a faster link's)

    @property
    def priority(self) -> int:
        """The order ready searches start in: the longest first."""
        return ("decode", "prefill", "colocated").index(self.kind)

    @property
    def label(self) -> str:
        if self.kind == "colocated":
            return f"colocated ({self.schedule})"
        return self.kind if self.gbps is None else f"{self.kind} (KV at {self.gbps:g} Gb/s)"


Progress = Callable[[int, int, int], None]  # (simulations so far, searches done, searches in all)
Follow = Callable[[Search, float], Sequence[Search]]  # a search's goodput -> the searches it makes ready

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

    def run(self, first: Sequence[Search], follow: Follow = lambda search, goodput: ()) -> dict[Search, float]:
        """Every search's goodput: `first`, and each that `follow` makes ready as results come."""
        ready, results = list(first), {}
        self._total += len(ready)
        running: dict[Future, Search] = {}
        while ready or running:
            ready.sort(key=lambda s: s.priority)
            if self._pool is None:
                search = ready.pop(0)
                self._finished(search, self.planner.search(search, self._tick), results, ready, follow)
                continue
            while ready and len(running) < self.jobs:
                search = ready.pop(0)
                running[self._pool.submit(_run, search)] = search
            self.num_simulations = self._counter.value
            if self.progress:
                self.progress(self.num_simulations, self._done, self._total)
            done = [f for f in running if f.done()]
            if not done:
                time.sleep(POLL_S)
            for future in done:
                self._finished(running.pop(future), future.result(), results, ready, follow)
        if self._counter is not None:
            self.num_simulations = self._counter.value
        if self.progress:
            self.progress(self.num_simulations, self._done, self._total)
        return results

    def _finished(self, search: Search, goodput: float, results: dict[Search, float], ready: list[Search],
                  follow: Follow) -> None:
        results[search] = goodput
        self._done += 1
        more = list(follow(search, goodput))
        self._total += len(more)
        ready.extend(more)

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
