"""Block pool: reference-counted KV blocks with hash-based prefix caching (no torch).

A block is free when its ref count is 0. Free blocks sit in one LRU queue; a free block
may still carry a prefix hash and be revived by a cache hit until it is handed out again,
which evicts its hash. Blocks without a hash are handed out first, so cached content
lives as long as possible. Allocation reports "no room" as None.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class BlockPool:
    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True):
        assert num_blocks > 0
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self.free)

    def allocate(self, num: int) -> list[int] | None:
        if num > len(self.free):
            return None
        out = []
        for _ in range(num):
            block_id, _ = self.free.popitem(last=False)
            self._evict(block_id)
            self.ref_cnt[block_id] = 1
            out.append(block_id)
        return out

    def lookup(self, hashes: Iterable[int]) -> list[int]:
        """Longest run of cached blocks matching hashes from the start; takes no references."""
        out = []
        for h in hashes:
            block_id = self.cached.get(h)
            if block_id is None:
                break
            out.append(block_id)
        return out

    def take(self, block_ids: Sequence[int]) -> None:
        """Adds a reference to each block (reviving free cached ones)."""
        for block_id in block_ids:
            if self.ref_cnt[block_id] == 0:
                del self.free[block_id]
            self.ref_cnt[block_id] += 1

    def release(self, block_ids: Sequence[int]) -> None:
        """Drops a reference; the tail of a sequence is freed first so it is evicted first."""
        for block_id in reversed(block_ids):
            assert self.ref_cnt[block_id] > 0, f"double free of block {block_id}"
            self.ref_cnt[block_id] -= 1
            if self.ref_cnt[block_id] == 0:
                self.free[block_id] = None
                if self.block_hash[block_id] is None:
                    self.free.move_to_end(block_id, last=False)

    def register(self, block_id: int, block_hash: int) -> None:
        """Marks a full block as holding the prefix with this hash."""
        if not self.enable_prefix_caching or block_hash in self.cached:
            return
        assert self.block_hash[block_id] is None
        self.cached[block_hash] = block_id
        self.block_hash[block_id] = block_hash

    def num_evictable(self, block_ids: Sequence[int]) -> int:
        return sum(1 for b in block_ids if self.ref_cnt[b] == 0)

    def reset_prefix_cache(self) -> None:
        for block_id in list(self.cached.values()):
            self._evict(block_id)

    def _evict(self, block_id: int) -> None:
        h = self.block_hash[block_id]
        if h is not None:
            del self.cached[h]
            self.block_hash[block_id] = None
