"""KV manager: maps requests to blocks of the pool (no torch).

A request's blocks cover its computed tokens plus the ones scheduled this step. Full
blocks are hashed as (parent hash, token ids) and registered when scheduled: within one
step every layer writes the whole batch's K/V before any attention reads it, so a second
request sharing a prefix may use blocks that the same step is filling.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv.block_pool import BlockPool
from engine.kv.prefix_hash import extend_block_hashes
from engine.request import Request


@dataclass
class PrefixCacheStats:
    queries_tokens: int = 0
    hit_tokens: int = 0


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.stats = PrefixCacheStats()

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _hashes(self, request: Request, num_full_blocks: int) -> list[int]:
        return extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size,
                                   num_full_blocks)[:num_full_blocks]

    def get_computed_blocks(self, request: Request) -> list[int]:
        """Cached blocks holding a prefix of the request; the last token is always recomputed."""
        if not self.enable_prefix_caching or request.computing_prompt_logprobs:
            return []
        num_full = (request.num_tokens - 1) // self.block_size
        blocks = self.pool.lookup(self._hashes(request, num_full))
        self.stats.queries_tokens += request.num_tokens
        self.stats.hit_tokens += len(blocks) * self.block_size
        return blocks

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[int] | None = None) -> bool:
        """Gives the request blocks for num_new_tokens more tokens (after computed_blocks).

        Returns False, changing nothing, when the pool has no room.
        """
        end = request.num_computed_tokens + num_new_tokens
        # a decode within its last block, no block to fill or register: nothing to do
        if not computed_blocks and end <= len(request.block_ids) * self.block_size and (
                not self.enable_prefix_caching or request.kv_predicted
                or end // self.block_size <= request.num_registered_blocks):
            return True
        computed_blocks = computed_blocks or []
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = self.blocks_needed(num_computed + num_new_tokens)
        need = total - len(request.block_ids) - len(computed_blocks)
        if need > self.pool.num_free - self.pool.num_evictable(computed_blocks):
            return False
        self.pool.take(computed_blocks)
        request.block_ids.extend(computed_blocks)
        if computed_blocks:
            request.num_registered_blocks = len(request.block_ids)
        if need > 0:
            new = self.pool.allocate(need)
            assert new is not None
            request.block_ids.extend(new)
        if self.enable_prefix_caching and not request.kv_predicted:  # predicted KV is approximate
            num_full = (num_computed + num_new_tokens) // self.block_size
            hashes = self._hashes(request, num_full)
            for i in range(request.num_registered_blocks, num_full):
                self.pool.register(request.block_ids[i], hashes[i])
            request.num_registered_blocks = max(request.num_registered_blocks, num_full)
        return True

    def reserve(self, request: Request, num_tokens: int) -> bool:
        """Blocks for num_tokens whose KV another engine will write. A cached prefix of the
        prompt is shared instead (request.num_cached_tokens says how much: the sender skips
        those blocks). The new blocks get no prefix hashes yet: they are registered by the
        first allocate_slots after the KV has landed."""
        assert not request.block_ids
        cached = self.get_computed_blocks(request) if num_tokens == request.num_prompt_tokens else []
        need = self.blocks_needed(num_tokens) - len(cached)
        if need > self.pool.num_free - self.pool.num_evictable(cached):
            return False
        self.pool.take(cached)
        blocks = self.pool.allocate(need)
        assert blocks is not None
        request.block_ids = cached + blocks
        request.num_registered_blocks = len(cached)
        request.num_cached_tokens = len(cached) * self.block_size
        return True

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.num_registered_blocks = 0

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def num_used_blocks(self) -> int:
        return self.pool.num_used
