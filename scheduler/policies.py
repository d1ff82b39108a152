"""Routing policies: pure functions from load snapshots to a (prefill, decode) pair.

No Ray, no torch, no clock: the global scheduler and the front doors call them live, and the
planner's simulator calls the very same ones. A policy gets the live prefill and decode
pools' loads and an `Ask` (the prompt's length, and how much of it each decode worker
probably holds in its prefix cache) and returns a `Route`, or None when no pair can take the
request (no live worker of a role, or no decode worker with room); the caller turns None
into backpressure (503 with Retry-After). A route without a prefill worker asks the decode
worker to prefill the prompt itself (conditional disaggregation).

Every worker can run both phases; its pool is where routing sends it work. The policies:
- `jsq`: Splitwise's join-the-shortest-queue: prefill by pending prompt tokens, decode by
  free KV blocks.
- `round-robin`: a load-blind baseline.
- `prefix`: decode on the worker holding the longest cached prefix of the prompt (unless it
  is much busier than the rest); the prefill worker sends only the uncached blocks.
- `conditional`: `prefix`, and the decode worker prefills itself when the uncached part is
  shorter than `local_prefill_tokens` or every prefill worker is full.
- `mixed`: Splitwise's mixed pool: when every worker of a pool is full, the least loaded
  worker of the other pool is lent to it and returns once idle; when nothing can be
  borrowed, the decode worker runs both phases.
A prefill worker is full when `pending + prompt > prefill_full_tokens` (Splitwise: 8192); a
decode worker when the prompt's blocks would not fit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.outputs import EngineStats


@dataclass(frozen=True)
class WorkerLoad:
    """A worker's load as last reported."""

    worker_id: str
    pending_prefill_tokens: int = 0  # prompt tokens queued or being prefilled
    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    block_size: int = 16
    alive: bool = True
    weight_bytes_dense: int = 0   # since start: weights its steps read (metrics only)
    weight_bytes_expert: int = 0
    prefill_s_per_token: float = 0.0  # measured: seconds per token of its prefill steps
    kv_prediction_cost: float = 0.0   # predicted prefill's share of full prefill's FLOPs; 0: no KV predictor
    num_predicted_prefills: int = 0   # since start (metrics only)
    wait_room: int = 0  # decode: requests its queue for KV blocks would still take (routed there with no free block)
    prefix_queries_tokens: int = 0  # since start: prompt tokens looked up in its prefix cache (metrics only)
    prefix_hit_tokens: int = 0      # since start: of those, found cached

    @classmethod
    def from_stats(cls, worker_id: str, stats: EngineStats, block_size: int, wait_room: int = 0) -> WorkerLoad:
        """The snapshot routing reads, from an engine's stats."""
        return cls(worker_id, stats.num_pending_prefill_tokens, stats.num_running, stats.num_waiting,
                   stats.num_kv_blocks_total - stats.num_kv_blocks_used, block_size, wait_room=wait_room,
                   weight_bytes_dense=stats.weight_bytes_dense, weight_bytes_expert=stats.weight_bytes_expert,
                   prefill_s_per_token=stats.prefill_s_per_token, kv_prediction_cost=stats.kv_prediction_cost,
                   num_predicted_prefills=stats.num_predicted_prefills,
                   prefix_queries_tokens=stats.prefix_cache_queries_tokens, prefix_hit_tokens=stats.prefix_cache_hit_tokens)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    @property
    def queue(self) -> int:
        return self.num_running + self.num_waiting

    @property
    def idle(self) -> bool:
        return self.queue == 0 and self.pending_prefill_tokens == 0


@dataclass(frozen=True)
class Ask:
    """What routing knows of one request."""

    num_prompt_tokens: int
    cached_tokens: Mapping[str, int] = field(default_factory=dict)  # worker id -> prompt tokens it likely caches

    def uncached(self, worker_id: str) -> int:
        return self.num_prompt_tokens - self.cached_tokens.get(worker_id, 0)


@dataclass(frozen=True)
class Route:
    prefill_id: str | None  # None: the decode worker prefills the prompt itself
    decode_id: str


@dataclass(frozen=True)
class PolicyConfig:
    local_prefill_tokens: int = 2048
    """conditional: the decode worker prefills a prompt whose uncached part is shorter than this."""
    prefill_full_tokens: int = 8192
    """conditional, mixed: a prefill worker is full when its pending prompt tokens plus this prompt exceed this."""
    prefix_balance_requests: int = 32
    """prefix, conditional: a cached prefix wins only on a worker within this many queued requests of the least busy."""

    def __post_init__(self) -> None:
        if self.local_prefill_tokens < 0 or self.prefill_full_tokens < 1 or self.prefix_balance_requests < 0:
            raise ValueError("--local-prefill-tokens and --prefix-balance-requests must be >= 0, "
                             "--prefill-full-tokens positive")


Policy = Callable[[Sequence[WorkerLoad], Sequence[WorkerLoad], Ask], "Route | None"]


def _fits(w: WorkerLoad, ask: Ask) -> bool:
    """Live, with free blocks for the prompt, or room in its queue to wait for them."""
    return w.alive and (w.num_free_blocks >= w.blocks_for(ask.uncached(w.worker_id)) or w.wait_room > 0)


def least_loaded_prefill(prefill: Sequence[WorkerLoad]) -> WorkerLoad | None:
    """The live prefill worker with the fewest pending prompt tokens (ties: less busy, lower id)."""
    return min((w for w in prefill if w.alive), key=lambda w: (w.pending_prefill_tokens, w.queue, w.worker_id),
               default=None)


def roomiest_decode(decode: Sequence[WorkerLoad], ask: Ask) -> WorkerLoad | None:
    """The live decode worker with the most free KV blocks among those with room for the prompt."""
    return min((w for w in decode if _fits(w, ask)), key=lambda w: (-w.num_free_blocks, w.queue, w.worker_id),
               default=None)


def prefix_decode(decode: Sequence[WorkerLoad], ask: Ask, balance: int) -> WorkerLoad | None:
    """The decode worker with the longest cached prefix among those with room and within
    `balance` queued requests of the least busy one; JSQ's order breaks ties."""
    fits = [w for w in decode if _fits(w, ask)]
    if not fits:
        return None
    least = min(w.queue for w in fits)
    return min(fits, key=lambda w: (-(ask.cached_tokens.get(w.worker_id, 0) if w.queue <= least + balance else 0),
                                    -w.num_free_blocks, w.queue, w.worker_id))


def _full(w: WorkerLoad, num_tokens: int, config: PolicyConfig) -> bool:
    return w.pending_prefill_tokens + num_tokens > config.prefill_full_tokens


def join_shortest_queue(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], ask: Ask) -> Route | None:
    """Splitwise's JSQ: the prefill worker with the fewest pending prompt tokens, the decode
    worker with the most free KV blocks among those that can hold the prompt. Ties go to
    the less busy worker, then to the lower id, so the choice is deterministic."""
    p, d = least_loaded_prefill(prefill), roomiest_decode(decode, Ask(ask.num_prompt_tokens))
    return Route(p.worker_id, d.worker_id) if p and d else None


def prefix_aware(config: PolicyConfig = PolicyConfig()) -> Policy:
    def policy(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], ask: Ask) -> Route | None:
        p, d = least_loaded_prefill(prefill), prefix_decode(decode, ask, config.prefix_balance_requests)
        return Route(p.worker_id, d.worker_id) if p and d else None
    return policy


def conditional(config: PolicyConfig = PolicyConfig()) -> Policy:
    """Prefill remotely only when the uncached part is long enough and a prefill worker has
    room for it; otherwise on the (prefix-aware) decode worker."""
    def policy(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], ask: Ask) -> Route | None:
        d = prefix_decode(decode, ask, config.prefix_balance_requests)
        if d is None:
            return None
        uncached = ask.uncached(d.worker_id)
        p = least_loaded_prefill(prefill)
        if uncached < config.local_prefill_tokens or p is None or _full(p, uncached, config):
            return Route(None, d.worker_id)
        return Route(p.worker_id, d.worker_id)
    return policy


class MixedPool:
    """Splitwise's three pools. `lent` maps a worker lent to the other pool to that pool's
    name; it returns to its own pool once a snapshot shows it idle."""

    def __init__(self, config: PolicyConfig = PolicyConfig()):
        self.config = config
        self.lent: dict[str, str] = {}

    def __call__(self, prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], ask: Ask) -> Route | None:
        for w in (*prefill, *decode):
            if w.worker_id in self.lent and (w.idle or not w.alive):
                del self.lent[w.worker_id]
        as_prefill = [*prefill, *(w for w in decode if self.lent.get(w.worker_id) == "prefill")]
        as_decode = [*decode, *(w for w in prefill if self.lent.get(w.worker_id) == "decode")]
        n = ask.num_prompt_tokens
        d = roomiest_decode(as_decode, ask)
        if d is None:  # the decode pool is full: borrow the prefill worker with the most room
            d = roomiest_decode([w for w in prefill if w.worker_id not in self.lent], ask)
            if d is None:
                return None
            self.lent[d.worker_id] = "decode"
        p = least_loaded_prefill([w for w in as_prefill if not _full(w, n, self.config) and w.worker_id != d.worker_id])
        if p is None:  # the prefill pool is full: borrow the least loaded decode worker
            p = least_loaded_prefill([w for w in decode if w.worker_id not in self.lent and w.worker_id != d.worker_id
                                      and not _full(w, n, self.config)])
            if p is None:  # nothing free: run both phases on the decode worker
                return Route(None, d.worker_id)
            self.lent[p.worker_id] = "prefill"
        return Route(p.worker_id, d.worker_id)


def use_kv_prediction(load: WorkerLoad, num_prompt_tokens: int, slo_ttft_s: float) -> bool:
    """KV prediction's rule: prefill this prompt from predicted KV when the worker has a
    predictor and its full prefill, behind the prompt tokens already queued there, would miss
    the TTFT SLO at the worker's measured prefill speed, while predicted prefill (which runs
    on arrival, at its FLOPs' share of that speed) would come sooner."""
    rate, cost = load.prefill_s_per_token, load.kv_prediction_cost
    if cost <= 0 or rate <= 0:
        return False
    full_s = (load.pending_prefill_tokens + num_prompt_tokens) * rate
    return full_s > slo_ttft_s and num_prompt_tokens * cost * rate < full_s


def round_robin() -> Policy:
    """Cycles through live workers of each role regardless of load (a baseline to compare)."""
    turn = {"p": 0, "d": 0}

    def pick(workers: Sequence[WorkerLoad], key: str) -> WorkerLoad | None:
        live = sorted((w for w in workers if w.alive), key=lambda w: w.worker_id)
        if not live:
            return None
        turn[key] += 1
        return live[(turn[key] - 1) % len(live)]

    def policy(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], ask: Ask) -> Route | None:
        p, d = pick(prefill, "p"), pick([w for w in decode if _fits(w, Ask(ask.num_prompt_tokens))], "d")
        return Route(p.worker_id, d.worker_id) if p and d else None

    return policy


POLICIES: dict[str, Callable[[PolicyConfig], Policy]] = {
    "jsq": lambda config: join_shortest_queue,
    "round-robin": lambda config: round_robin(),
    "prefix": prefix_aware,
    "conditional": conditional,
    "mixed": MixedPool,
}
DEFAULT_POLICY = "jsq"
PREFIX_POLICIES = ("prefix", "conditional")  # the router tracks cached prefixes for these
