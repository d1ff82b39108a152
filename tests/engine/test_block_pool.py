"""Block pool and KV manager with plain numbers (no torch)."""

from engine.kv.block_pool import BlockPool
from engine.kv.manager import KVCacheManager
from engine.request import Request
from engine.sampling_params import SamplingParams


def test_allocate_release_and_no_room():
    pool = BlockPool(4)
    a = pool.allocate(3)
    assert a is not None and pool.num_free == 1
    assert pool.allocate(2) is None and pool.num_free == 1  # no room is a value, nothing changes
    pool.release(a)
    assert pool.num_free == 4 and all(c == 0 for c in pool.ref_cnt)


def test_cached_blocks_survive_until_reused_and_are_evicted_last():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.register(a, 111)
    pool.release([a, b, c])
    assert pool.lookup([111]) == [a]
    # uncached blocks go out first; the cached one is evicted only when nothing else is left
    first, second = pool.allocate(2)
    assert a not in (first, second) and pool.lookup([111]) == [a]
    (third,) = pool.allocate(1)
    assert third == a and pool.lookup([111]) == []


def test_take_revives_a_free_cached_block():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.register(a, 7)
    pool.release([a])
    pool.take(pool.lookup([7]))
    assert pool.ref_cnt[a] == 1 and pool.num_free == 1
    pool.release([a])


def _request(tokens, rid="r"):
    return Request(rid, tokens, SamplingParams(max_tokens=4), (0,), 1024)


def test_manager_shares_full_prefix_blocks_and_counts_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r1 = _request(list(range(1, 11)))  # 10 tokens: 2 full blocks + 2
    assert kv.allocate_slots(r1, 10)
    r2 = _request(list(range(1, 9)) + [99, 98, 97], "r2")
    cached = kv.get_computed_blocks(r2)
    assert cached == r1.block_ids[:2]
    assert kv.stats.hit_tokens == 8
    assert kv.allocate_slots(r2, 3, cached)
    assert r2.block_ids[:2] == r1.block_ids[:2]
    assert kv.pool.ref_cnt[r1.block_ids[0]] == 2
    kv.free(r1)
    kv.free(r2)
    assert kv.num_used_blocks == 0


def test_last_token_is_never_served_from_cache():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r1 = _request([1, 2, 3, 4, 5, 6, 7, 8])
    assert kv.allocate_slots(r1, 8)
    r2 = _request([1, 2, 3, 4, 5, 6, 7, 8], "r2")
    assert len(kv.get_computed_blocks(r2)) == 1  # 7 tokens may be cached: one full block
    kv.free(r1)


def test_allocate_slots_without_room_changes_nothing():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    r = _request(list(range(12)))
    assert not kv.allocate_slots(r, 12)
    assert r.block_ids == [] and kv.num_free_blocks == 2
