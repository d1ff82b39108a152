"""Router: a view of the workers' load snapshots, and a policy applied over it.

The global scheduler holds the authoritative view (registrations, polls, failures); each
front door holds a replica refreshed from the scheduler's snapshot every few tens of
milliseconds and routes locally, so a request pays no call to the scheduler actor and the
routing rate grows with the number of front doors. Between refreshes every route is
counted against the chosen workers (prompt tokens pending, blocks taken), so a burst
spreads out instead of landing on the worker that looked emptiest. No Ray, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from scheduler.policies import POLICIES, WorkerLoad, least_loaded_prefill


@dataclass(frozen=True)
class WorkerView:
    """One worker as routing sees it."""

    worker_id: str
    role: str  # prefill | decode
    address: str
    load: WorkerLoad
    num_total_blocks: int = 0


@dataclass(frozen=True)
class Target:
    prefill_id: str
    prefill_address: str
    decode_id: str
    decode_address: str


class Router:
    def __init__(self, policy: str = "jsq"):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (choices: {', '.join(POLICIES)})")
        self._policy = POLICIES[policy]()
        self.views: dict[str, WorkerView] = {}
        self.num_routed: dict[str, int] = {}

    def update(self, views: list[WorkerView]) -> None:
        """Replaces the whole view (a fresh snapshot)."""
        self.views = {v.worker_id: v for v in views}

    def put(self, view: WorkerView) -> None:
        self.views[view.worker_id] = view

    def set_alive(self, worker_id: str, alive: bool) -> bool:
        """Returns whether this changed anything."""
        view = self.views.get(worker_id)
        if view is None or view.load.alive == alive:
            return False
        self.views[worker_id] = replace(view, load=replace(view.load, alive=alive))
        return True

    def route(self, num_prompt_tokens: int) -> Target | None:
        prefill, decode = self._loads("prefill"), self._loads("decode")
        route = self._policy(prefill, decode, num_prompt_tokens)
        if route is None:
            return None
        p, d = self.views[route.prefill_id], self.views[route.decode_id]
        self._charge(p, pending_prefill_tokens=p.load.pending_prefill_tokens + num_prompt_tokens)
        self._charge(d, num_free_blocks=max(0, d.load.num_free_blocks - d.load.blocks_for(num_prompt_tokens)),
                     num_running=d.load.num_running + 1)
        return Target(p.worker_id, p.address, d.worker_id, d.address)

    def another_prefill(self, failed_addresses: list[str]) -> WorkerView | None:
        """The least loaded live prefill worker not at a failed address (a worker restarted at
        a new address counts as another)."""
        best = least_loaded_prefill([v.load for v in self.views.values()
                                     if v.role == "prefill" and v.address not in failed_addresses])
        if best is None:
            return None
        view = self.views[best.worker_id]
        self._charge(view)
        return view

    def _loads(self, role: str) -> list[WorkerLoad]:
        return [v.load for v in self.views.values() if v.role == role]

    def _charge(self, view: WorkerView, **load_changes) -> None:
        self.num_routed[view.worker_id] = self.num_routed.get(view.worker_id, 0) + 1
        if load_changes:
            self.views[view.worker_id] = replace(view, load=replace(view.load, **load_changes))
