"""Semi-PD: the prefill stream's view of KV blocks that the decode side lent it (no torch).

The decode side owns the pool: it reserves a prompt's blocks, takes one more reference on
them for the prefill stream and `lend`s them here. The prefill engine's batcher then
computes into exactly those blocks: `allocate_slots` hands them out (never more), the
cached prefix the decode side found counts as computed, and `free` gives them back through
`give_back`, which drops the prefill stream's reference on the decode side. So blocks a
request was aborted with stay out of the pool until the prefill stream has stopped writing
them. Thread-safe: `lend` runs on the decode thread, the rest on the prefill thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from engine.kv.manager import PrefixCacheStats
from engine.request import Request


@dataclass(frozen=True)
class Loan:
    block_ids: tuple[int, ...]
    num_cached_blocks: int  # leading blocks the decode side had cached: computed already


class LentBlocks:
    def __init__(self, block_size: int, give_back: Callable[[list[int]], None]):
        self.block_size = block_size
        self.give_back = give_back
        self.stats = PrefixCacheStats()
        self._loans: dict[str, Loan] = {}
        self._lock = threading.Lock()

    def lend(self, request_id: str, block_ids: list[int], num_cached_blocks: int) -> None:
        with self._lock:
            assert request_id not in self._loans, f"{request_id} already holds lent blocks"
            self._loans[request_id] = Loan(tuple(block_ids), num_cached_blocks)

    def cancel(self, request_id: str) -> None:
        """Returns the request's blocks to the decode side (the prefill is done with them, or
        never started)."""
        with self._lock:
            loan = self._loans.pop(request_id, None)
        if loan is not None:
            self.give_back(list(loan.block_ids))

    def _loan(self, request: Request) -> Loan:
        with self._lock:
            loan = self._loans.get(request.request_id)
        assert loan is not None, f"no blocks were lent for {request.request_id}"
        return loan

    def get_computed_blocks(self, request: Request) -> list[int]:
        loan = self._loan(request)
        self.stats.queries_tokens += request.num_tokens
        self.stats.hit_tokens += loan.num_cached_blocks * self.block_size
        return list(loan.block_ids[:loan.num_cached_blocks])

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: list[int] | None = None) -> bool:
        if not request.block_ids:
            request.block_ids = list(self._loan(request).block_ids)
        computed = request.num_computed_tokens + len(computed_blocks or []) * self.block_size
        assert computed + num_new_tokens <= len(request.block_ids) * self.block_size, \
            f"{request.request_id} would write beyond its lent blocks"
        return True

    def free(self, request: Request) -> None:
        request.block_ids = []
        self.cancel(request.request_id)

    @property
    def num_used_blocks(self) -> int:
        with self._lock:
            return sum(len(loan.block_ids) for loan in self._loans.values())
