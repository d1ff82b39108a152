"""Router: a view of the workers' load snapshots, and a policy applied over it.

The global scheduler holds the authoritative view (registrations, polls, failures); each
front door holds a replica refreshed from the scheduler's snapshot every few tens of
milliseconds and routes locally, so a request pays no call to the scheduler actor and the
routing rate grows with the number of front doors. Between refreshes every route is
counted against the chosen workers (prompt tokens pending, blocks taken), so a burst
spreads out instead of landing on the worker that looked emptiest. No Ray, no torch.

For the prefix-aware policies the router also remembers, per decode worker, the prompt
blocks it sent there (chained block hashes, as the engine's prefix cache names them, up to
the worker's block count, least recently routed forgotten first): an estimate of what each
worker caches, which becomes the policy's `Ask.cached_tokens`. A worker's pool (`role`) may
change while it runs (the role controller); its view keeps the new pool across polls.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, replace

from engine.kv.prefix_hash import prompt_block_hashes
from scheduler.policies import DEFAULT_POLICY, POLICIES, PREFIX_POLICIES, Ask, PolicyConfig, Route, WorkerLoad, least_loaded_prefill


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
    prefill_id: str  # "" when the decode worker prefills the prompt itself
    prefill_address: str
    decode_id: str
    decode_address: str

    @property
    def local(self) -> bool:
        return not self.prefill_id


class PrefixIndex:
    """Block hashes routed to one worker, least recently routed first out."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._hashes: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: list[int]) -> int:
        """How many leading blocks of the prompt the worker probably holds."""
        n = 0
        while n < len(hashes) and hashes[n] in self._hashes:
            n += 1
        return n

    def add(self, hashes: list[int]) -> None:
        for h in hashes:
            self._hashes[h] = None
            self._hashes.move_to_end(h)
        while len(self._hashes) > self.capacity:
            self._hashes.popitem(last=False)


class Router:
    def __init__(self, policy: str = DEFAULT_POLICY, config: PolicyConfig = PolicyConfig()):
        if policy not in POLICIES:
            raise ValueError(f"unknown routing policy {policy!r} (choices: {', '.join(POLICIES)})")
        self.policy_name = policy
        self._policy = POLICIES[policy](config)
        self.views: dict[str, WorkerView] = {}
        self.num_routed: dict[str, int] = {}
        self.num_local: int = 0  # requests the decode worker prefilled itself
        self._prefixes: dict[str, PrefixIndex] = {}

    @property
    def lent(self) -> dict[str, str]:
        """Workers lent to the other pool (the mixed pool), by the pool they serve."""
        return dict(getattr(self._policy, "lent", {}))

    def update(self, views: list[WorkerView]) -> None:
        """Replaces the whole view (a fresh snapshot)."""
        self.views = {v.worker_id: v for v in views}

    def set_role(self, worker_id: str, role: str) -> bool:
        """Moves a worker to another pool; returns whether this changed anything."""
        view = self.views.get(worker_id)
        if view is None or view.role == role:
            return False
        self.views[worker_id] = replace(view, role=role)
        return True

    def put(self, view: WorkerView) -> None:
        self.views[view.worker_id] = view

    def set_alive(self, worker_id: str, alive: bool) -> bool:
        """Returns whether this changed anything."""
        view = self.views.get(worker_id)
        if view is None or view.load.alive == alive:
            return False
        self.views[worker_id] = replace(view, load=replace(view.load, alive=alive))
        return True

    def route(self, num_prompt_tokens: int, prompt_token_ids: list[int] | None = None,
              local: bool = False) -> Target | None:
        """A (prefill, decode) pair for the prompt, or None (no route now). The prefix-aware
        policies need the token ids; the others only their count. local: the decode worker
        must compute the whole prompt itself (its prompt logprobs come from that forward; no
        cached prefix counts)."""
        prefill, decode = self._loads("prefill"), self._loads("decode")
        hashes, cached = [], {}
        if self.policy_name in PREFIX_POLICIES and prompt_token_ids:
            block_size = next((w.block_size for w in decode), 16)
            hashes = prompt_block_hashes(prompt_token_ids, block_size)
            cached = {w.worker_id: self._prefixes[w.worker_id].match(hashes) * w.block_size
                      for w in decode if w.worker_id in self._prefixes}
        route = self._policy(prefill, decode, Ask(num_prompt_tokens, cached))
        if route is None:
            return None
        if local:
            route, cached = Route(None, route.decode_id), {}
        d = self.views[route.decode_id]
        uncached = num_prompt_tokens - cached.get(d.worker_id, 0)
        if hashes:
            index = self._prefixes.setdefault(d.worker_id, PrefixIndex(max(1, d.num_total_blocks)))
            index.add(hashes)
        needed = d.load.blocks_for(uncached)
        if d.load.num_free_blocks >= needed:
            blocks = dict(num_free_blocks=d.load.num_free_blocks - needed, num_running=d.load.num_running + 1)
        else:  # it waits in the worker's queue for blocks
            blocks = dict(wait_room=max(0, d.load.wait_room - 1), num_waiting=d.load.num_waiting + 1)
        if route.prefill_id is None:  # the decode worker computes the uncached part itself
            self.num_local += 1
            self._charge(d, pending_prefill_tokens=d.load.pending_prefill_tokens + uncached, **blocks)
            return Target("", "", d.worker_id, d.address)
        p = self.views[route.prefill_id]
        self._charge(p, pending_prefill_tokens=p.load.pending_prefill_tokens + num_prompt_tokens)
        self._charge(d, **blocks)
        return Target(p.worker_id, p.address, d.worker_id, d.address)

    def why_no_route(self) -> str:
        """Why `route` found nothing: which pool has no live worker, else no room."""
        live = {role: any(v.role == role and v.load.alive for v in self.views.values()) for role in ("prefill", "decode")}
        if not live["decode"]:
            return "no decode worker is up"
        if not live["prefill"] and self.policy_name != "conditional":
            return "no prefill worker is up"
        return "no decode worker has room for this prompt now"

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
