"""The global scheduler: the registry of live workers, their load, and each request's route.

Runs as a Ray actor (scheduler/cluster.py wraps this class). Workers `register` when they
start, and again when Ray restarts them (a new address and incarnation replace the entry).
A thread polls every worker's load over gRPC each `poll_interval_s`; a worker that cannot be
reached, or leaves `max_missed_polls` polls in a row unanswered (a busy worker answers late
now and then), is not routed to until a poll succeeds again, and `report_failure` (a caller
saw a stream or call break) takes it out at once. Between polls each route is counted
against the chosen workers' snapshots (prompt tokens pending, blocks taken), so a burst of
requests spreads out instead of all landing on the worker that looked emptiest.

The view and the policy live in a Router (scheduler/router.py). Front doors route on
replicas of it refreshed from `snapshot()`; `route` serves callers without one;
`reroute_prefill` names another prefill worker for a request whose prefill worker failed.

With a role controller (scheduler/controller.py), front doors `report_latencies` of the
requests they finished, and every window a thread asks the controller whether a worker
should change pools, and moves it in the view (the replicas follow at their next refresh);
`control_status()` tells /metrics what it decided. A worker that restarts rejoins its home
pool. No torch here.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, replace

from engine.config import Role
from scheduler.controller import ControllerConfig, Decision, RoleController
from scheduler.policies import DEFAULT_POLICY, PolicyConfig, WorkerLoad
from scheduler.router import Router, Target, WorkerView

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker tells the scheduler when it (re)starts."""

    worker_id: str
    role: Role  # the pool it started in: prefill | decode
    address: str  # host:port of its gRPC service
    incarnation: str
    pid: int
    max_model_len: int
    vocab_size: int
    block_size: int
    num_total_blocks: int
    kv_prediction_cost: float = 0.0  # its KV predictor's, known at start (0: none), so routing need not wait for a poll


class GlobalScheduler:
    def __init__(self, policy: str = DEFAULT_POLICY, poll_interval_s: float = 0.05, load_timeout_s: float = 1.0,
                 max_missed_polls: int = 5, load_client=None, policy_config: PolicyConfig = PolicyConfig(),
                 controller: RoleController | None = None):
        self.policy = policy
        self._router = Router(policy, policy_config)
        self._controller = controller
        self._latencies: list[tuple[float, float | None]] = []  # (ttft, tpot) finished since the last window
        self._decision = Decision("off" if controller is None else "few-samples")
        self._moves: dict[str, int] = {"prefill": 0, "decode": 0}  # workers moved into each pool
        self.poll_interval_s, self.load_timeout_s = poll_interval_s, load_timeout_s
        self._infos: dict[str, WorkerInfo] = {}
        self._failures: dict[str, int] = {}
        self.max_missed_polls = max_missed_polls
        self._missed: dict[str, int] = {}  # consecutive unanswered polls
        self._lock = threading.Lock()
        self._stop = threading.Event()
        if load_client is None:
            from scheduler.worker_rpc import LoadClient
            load_client = LoadClient()
        self._loads = load_client
        threading.Thread(target=self._poll_loop, name="pdserve-load-poll", daemon=True).start()
        if controller is not None:
            threading.Thread(target=self._control_loop, args=(controller.config,), name="pdserve-role-controller",
                             daemon=True).start()

    def report_latencies(self, samples: list[tuple[float, float | None]]) -> None:
        """Front doors: (TTFT, TPOT or None) of requests finished since their last report."""
        with self._lock:
            if self._controller is not None:
                self._latencies.extend(samples)

    def control_once(self) -> Decision:
        """One controller window: decide on the samples gathered since the last, apply a move."""
        with self._lock:
            samples, self._latencies = self._latencies, []
            views = list(self._router.views.values())
            prefill = [v.load for v in views if v.role == "prefill"]
            decode = [v.load for v in views if v.role == "decode"]
            decision = self._controller.decide([t for t, _ in samples], [t for _, t in samples if t is not None],
                                               prefill, decode)
            self._decision = decision
            if decision.move is not None:
                worker_id, pool = decision.move
                self._router.set_role(worker_id, pool)
                self._moves[pool] += 1
        if decision.move is not None:
            log.info("role controller: %s joins the %s pool (p%d TTFT %.3f s, TPOT %.3f s)", *decision.move,
                     round(self._controller.config.quantile * 100), decision.ttft_s, decision.tpot_s)
        return decision

    def control_status(self) -> dict:
        """What the controller decided last, and how many workers it moved into each pool."""
        with self._lock:
            d = self._decision
            return {"verdict": d.verdict, "ttft_s": d.ttft_s, "tpot_s": d.tpot_s, "moves": dict(self._moves)}

    def set_role(self, worker_id: str, pool: str) -> bool:
        """Moves a worker to another pool by hand (operators, tests)."""
        with self._lock:
            return self._router.set_role(worker_id, pool)

    def register(self, info: WorkerInfo) -> None:
        with self._lock:
            old = self._infos.get(info.worker_id)
            self._infos[info.worker_id] = info
            load = WorkerLoad(info.worker_id, num_free_blocks=info.num_total_blocks, block_size=info.block_size,
                              kv_prediction_cost=info.kv_prediction_cost)
            self._router.put(WorkerView(info.worker_id, info.role, info.address, load, info.num_total_blocks))
        if old is not None and old.address != info.address:
            self._loads.forget(old.address)
        log.info("%s %s at %s (%s)", "rejoined:" if old else "registered:", info.worker_id, info.address,
                 info.incarnation)

    def snapshot(self) -> list[WorkerView]:
        """The current view, for front doors' router replicas."""
        with self._lock:
            return list(self._router.views.values())

    def route(self, num_prompt_tokens: int) -> Target | None:
        with self._lock:
            return self._router.route(num_prompt_tokens)

    def reroute_prefill(self, failed: list[tuple[str, str]]) -> tuple[str, str] | None:
        """Another live prefill worker (id, address) for a request whose prefill failed on the
        failed (id, address) pairs, which stop being routed to until a poll finds them alive."""
        with self._lock:
            for worker_id, address in failed:
                self._mark_failed(worker_id, address)
            view = self._router.another_prefill([address for _, address in failed])
            return (view.worker_id, view.address) if view else None

    def report_failure(self, worker_id: str, address: str) -> None:
        """A caller saw this worker fail: no routes to it until it answers a poll again."""
        with self._lock:
            self._mark_failed(worker_id, address)

    def workers(self) -> list[dict]:
        """The registry as plain values (tests, metrics, logs)."""
        with self._lock:
            out = []
            for worker_id, view in sorted(self._router.views.items()):
                info, load = self._infos[worker_id], view.load
                out.append({"worker_id": worker_id, "role": view.role, "home": info.role, "address": info.address,
                            "incarnation": info.incarnation, "pid": info.pid, "alive": load.alive,
                            "num_routed": self._router.num_routed.get(worker_id, 0),
                            "num_failures": self._failures.get(worker_id, 0), "num_running": load.num_running,
                            "num_waiting": load.num_waiting, "pending_prefill_tokens": load.pending_prefill_tokens,
                            "num_free_blocks": load.num_free_blocks, "num_total_blocks": info.num_total_blocks})
            return out

    def count_routes(self, counts: dict[str, int]) -> None:
        """Front doors route on replicas and report how many requests went to each worker."""
        with self._lock:
            for worker_id, n in counts.items():
                self._router.num_routed[worker_id] = self._router.num_routed.get(worker_id, 0) + n

    def model_limits(self) -> tuple[int, int] | None:
        """(max_model_len, vocab_size), the smallest over registered workers; None before any."""
        with self._lock:
            infos = list(self._infos.values())
        if not infos:
            return None
        return min(i.max_model_len for i in infos), min(i.vocab_size for i in infos)

    def stop(self) -> None:
        self._stop.set()

    def _mark_failed(self, worker_id: str, address: str | None = None) -> None:
        """Only the incarnation at `address` when given (a report may concern an older one)."""
        info = self._infos.get(worker_id)
        if info is None or (address is not None and info.address != address):
            return
        if self._router.set_alive(worker_id, False):
            self._failures[worker_id] = self._failures.get(worker_id, 0) + 1
            log.warning("worker %s is not answering: no longer routed to", worker_id)

    def _control_loop(self, config: ControllerConfig) -> None:
        next_s = time.monotonic() + config.window_s
        while not self._stop.wait(max(0.0, next_s - time.monotonic())):
            next_s += config.window_s
            try:
                self.control_once()
            except Exception:
                log.exception("role controller failed")

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_interval_s):
            try:
                self.poll_once()
            except Exception:
                log.exception("load poll failed")

    def poll_once(self) -> None:
        """Asks every worker for its load and updates the view (the poll thread's step)."""
        with self._lock:
            targets = {i.address: (i.worker_id, i.incarnation) for i in self._infos.values()}
        if not targets:
            return
        results = self._loads.poll(list(targets), self.load_timeout_s)
        with self._lock:
            for address, result in results.items():
                worker_id, incarnation = targets[address]
                info = self._infos.get(worker_id)
                if info is None or info.incarnation != incarnation:
                    continue  # re-registered meanwhile
                if isinstance(result, Exception):
                    self._missed[worker_id] = missed = self._missed.get(worker_id, 0) + 1
                    if not _timed_out(result) or missed >= self.max_missed_polls:
                        self._mark_failed(worker_id)
                    continue
                self._missed[worker_id] = 0
                load, seen = result
                if seen == incarnation:
                    view = self._router.views[worker_id]
                    self._router.put(replace(view, load=replace(load, worker_id=worker_id, alive=True)))

def _timed_out(error: Exception) -> bool:
    code = getattr(error, "code", None)
    return callable(code) and code().name == "DEADLINE_EXCEEDED"
