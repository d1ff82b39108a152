"""The global scheduler: the registry of live workers, their load, and each request's route.

Runs as a Ray actor (scheduler/cluster.py wraps this class). Workers `register` when they
start, and again when Ray restarts them (a new address and incarnation replace the entry).
A thread polls every worker's load over gRPC each `poll_interval_s`; a worker whose poll
fails or times out is not routed to until a poll succeeds again, and `report_failure` (the
front door saw a stream break) takes it out at once. Between polls each route is counted
against the chosen workers' snapshots (prompt tokens pending, blocks taken), so a burst of
requests spreads out instead of all landing on the worker that looked emptiest.

`route` asks the policy (a pure function of the snapshots, scheduler/policies.py) for a
(prefill, decode) pair; `reroute_prefill` names another prefill worker for a request whose
prefill worker failed. No torch here.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace

from scheduler.policies import POLICIES, WorkerLoad, least_loaded_prefill

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the scheduler when it (re)starts."""

    worker_id: str
    role: str  # prefill | decode
    address: str  # host:port of its gRPC service
    incarnation: str
    pid: int
    max_model_len: int
    vocab_size: int
    block_size: int
    num_total_blocks: int


@dataclass(frozen=True)
class Target:
    prefill_id: str
    prefill_address: str
    decode_id: str
    decode_address: str


@dataclass
class _Entry:
    info: WorkerInfo
    load: WorkerLoad
    num_routed: int = 0
    num_failures: int = 0


class GlobalScheduler:
    def __init__(self, policy: str = "jsq", poll_interval_s: float = 0.05, load_timeout_s: float = 1.0,
                 load_client=None):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (choices: {', '.join(POLICIES)})")
        self._policy = POLICIES[policy]()
        self.poll_interval_s, self.load_timeout_s = poll_interval_s, load_timeout_s
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if load_client is None:
            from scheduler.worker_rpc import LoadClient
            load_client = LoadClient()
        self._loads = load_client
        self.num_routes = self.num_unroutable = 0
        threading.Thread(target=self._poll_loop, name="pdserve-load-poll", daemon=True).start()

    def register(self, info: WorkerInfo) -> None:
        with self._lock:
            old = self._entries.get(info.worker_id)
            load = WorkerLoad(info.worker_id, num_free_blocks=info.num_total_blocks, block_size=info.block_size)
            self._entries[info.worker_id] = _Entry(info, load, *(
                (old.num_routed, old.num_failures) if old else (0, 0)))
        if old is not None and old.info.address != info.address:
            self._loads.forget(old.info.address)
        log.info("%s %s at %s (%s)", "rejoined:" if old else "registered:", info.worker_id, info.address,
                 info.incarnation)

    def route(self, num_prompt_tokens: int) -> Target | None:
        with self._lock:
            prefill, decode = self._loads_of("prefill"), self._loads_of("decode")
            route = self._policy(prefill, decode, num_prompt_tokens)
            if route is None:
                self.num_unroutable += 1
                return None
            p, d = self._entries[route.prefill_id], self._entries[route.decode_id]
            p.num_routed += 1
            d.num_routed += 1
            p.load = replace(p.load, pending_prefill_tokens=p.load.pending_prefill_tokens + num_prompt_tokens)
            d.load = replace(d.load, num_free_blocks=max(0, d.load.num_free_blocks - d.load.blocks_for(num_prompt_tokens)),
                             num_running=d.load.num_running + 1)
            self.num_routes += 1
            return Target(p.info.worker_id, p.info.address, d.info.worker_id, d.info.address)

    def reroute_prefill(self, failed_ids: list[str]) -> tuple[str, str] | None:
        """Another live prefill worker (id, address) for a request whose prefill failed on
        failed_ids, which stop being routed to until a poll finds them alive again."""
        with self._lock:
            for worker_id in failed_ids:
                self._mark_failed(worker_id)
            candidates = [e.load for e in self._entries.values()
                          if e.info.role == "prefill" and e.info.worker_id not in failed_ids]
            best = least_loaded_prefill(candidates)
            if best is None:
                return None
            entry = self._entries[best.worker_id]
            entry.num_routed += 1
            return entry.info.worker_id, entry.info.address

    def report_failure(self, worker_id: str, address: str) -> None:
        """A caller saw this worker fail: no routes to it until it answers a poll again."""
        with self._lock:
            entry = self._entries.get(worker_id)
            if entry is not None and entry.info.address == address:
                self._mark_failed(worker_id)

    def workers(self) -> list[dict]:
        """The registry as plain values (tests, metrics, `pdserve` logs)."""
        with self._lock:
            return [{"worker_id": e.info.worker_id, "role": e.info.role, "address": e.info.address,
                     "incarnation": e.info.incarnation, "pid": e.info.pid, "alive": e.load.alive,
                     "num_routed": e.num_routed, "num_failures": e.num_failures,
                     "num_running": e.load.num_running, "num_waiting": e.load.num_waiting,
                     "pending_prefill_tokens": e.load.pending_prefill_tokens,
                     "num_free_blocks": e.load.num_free_blocks, "num_total_blocks": e.info.num_total_blocks}
                    for e in sorted(self._entries.values(), key=lambda e: e.info.worker_id)]

    def model_limits(self) -> tuple[int, int] | None:
        """(max_model_len, vocab_size), the smallest over registered workers; None before any."""
        with self._lock:
            infos = [e.info for e in self._entries.values()]
        if not infos:
            return None
        return min(i.max_model_len for i in infos), min(i.vocab_size for i in infos)

    def stop(self) -> None:
        self._stop.set()

    def _loads_of(self, role: str) -> list[WorkerLoad]:
        return [e.load for e in self._entries.values() if e.info.role == role]

    def _mark_failed(self, worker_id: str) -> None:
        entry = self._entries.get(worker_id)
        if entry is not None and entry.load.alive:
            entry.load = replace(entry.load, alive=False)
            entry.num_failures += 1
            log.warning("worker %s is not answering: no longer routed to", worker_id)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            with self._lock:
                targets = {e.info.address: (e.info.worker_id, e.info.incarnation) for e in self._entries.values()}
            if not targets:
                continue
            try:
                results = self._loads.poll(list(targets), self.load_timeout_s)
            except Exception:
                log.exception("load poll failed")
                continue
            with self._lock:
                for address, result in results.items():
                    worker_id, incarnation = targets[address]
                    entry = self._entries.get(worker_id)
                    if entry is None or entry.info.incarnation != incarnation:
                        continue  # re-registered meanwhile
                    if isinstance(result, Exception):
                        self._mark_failed(worker_id)
                        continue
                    load, seen = result
                    if seen == incarnation:
                        entry.load = replace(load, worker_id=worker_id, alive=True)
