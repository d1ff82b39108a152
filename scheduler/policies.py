"""Routing policies: pure functions from load snapshots to a (prefill, decode) pair.

No Ray, no torch, no clock: the global scheduler calls them live, and the planner's
simulator will call the very same functions. A policy returns None when no pair can take
the request (no live worker of a role, or no decode worker with room for the prompt); the
caller turns that into backpressure (503 with Retry-After).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass


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

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)


@dataclass(frozen=True)
class Route:
    prefill_id: str
    decode_id: str


Policy = Callable[[Sequence[WorkerLoad], Sequence[WorkerLoad], int], "Route | None"]


def least_loaded_prefill(prefill: Sequence[WorkerLoad]) -> WorkerLoad | None:
    """The live prefill worker with the fewest pending prompt tokens (ties: less busy, lower id)."""
    return min((w for w in prefill if w.alive),
               key=lambda w: (w.pending_prefill_tokens, w.num_running + w.num_waiting, w.worker_id), default=None)


def join_shortest_queue(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad],
                        num_prompt_tokens: int) -> Route | None:
    """Splitwise's JSQ: the prefill worker with the fewest pending prompt tokens, the decode
    worker with the most free KV blocks among those that can hold the prompt. Ties go to
    the less busy worker, then to the lower id, so the choice is deterministic."""
    p = least_loaded_prefill(prefill)
    fits = [w for w in decode if w.alive and w.num_free_blocks >= w.blocks_for(num_prompt_tokens)]
    d = min(fits, key=lambda w: (-w.num_free_blocks, w.num_running + w.num_waiting, w.worker_id), default=None)
    if p is None or d is None:
        return None
    return Route(p.worker_id, d.worker_id)


def round_robin() -> Policy:
    """Cycles through live workers of each role regardless of load (a baseline to compare)."""
    turn = {"p": 0, "d": 0}

    def pick(workers: Sequence[WorkerLoad], key: str) -> WorkerLoad | None:
        live = sorted((w for w in workers if w.alive), key=lambda w: w.worker_id)
        if not live:
            return None
        turn[key] += 1
        return live[(turn[key] - 1) % len(live)]

    def policy(prefill: Sequence[WorkerLoad], decode: Sequence[WorkerLoad], num_prompt_tokens: int) -> Route | None:
        fits = [w for w in decode if w.alive and w.num_free_blocks >= w.blocks_for(num_prompt_tokens)]
        p, d = pick(prefill, "p"), pick(fits, "d")
        return Route(p.worker_id, d.worker_id) if p and d else None

    return policy


POLICIES: dict[str, Callable[[], Policy]] = {
    "jsq": lambda: join_shortest_queue,
    "round-robin": round_robin,
}
