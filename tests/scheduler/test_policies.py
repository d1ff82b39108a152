"""Routing policies on plain numbers; they import neither torch nor ray."""

import subprocess
import sys

from scheduler.policies import (
    POLICIES,
    Ask,
    MixedPool,
    PolicyConfig,
    Route,
    WorkerLoad,
    conditional,
    join_shortest_queue,
    prefix_aware,
)


def P(wid, pending=0, running=0, alive=True, free=0):
    return WorkerLoad(wid, pending_prefill_tokens=pending, num_running=running, num_free_blocks=free, alive=alive)


def D(wid, free, running=0, alive=True):
    return WorkerLoad(wid, num_free_blocks=free, num_running=running, block_size=16, alive=alive)


def test_jsq_picks_least_pending_prefill_and_most_free_decode():
    route = join_shortest_queue([P("p0", 500), P("p1", 20), P("p2", 300)], [D("d0", 10), D("d1", 90)], Ask(100))
    assert route == Route("p1", "d1")


def test_jsq_skips_dead_workers_and_decodes_without_room():
    prefill = [P("p0", 0, alive=False), P("p1", 900)]
    decode = [D("d0", 500, alive=False), D("d1", 6), D("d2", 7)]
    assert join_shortest_queue(prefill, decode, Ask(100)) == Route("p1", "d2")  # 100 tokens need 7 blocks
    assert join_shortest_queue(prefill, decode, Ask(200)) is None  # 13 blocks: nobody has room
    assert join_shortest_queue([P("p0", alive=False)], decode, Ask(1)) is None


def test_jsq_breaks_ties_by_load_then_id():
    assert join_shortest_queue([P("b", 5, running=1), P("a", 5, running=3)], [D("y", 9), D("x", 9)], Ask(1)) == \
        Route("b", "x")


def test_round_robin_cycles_live_workers():
    policy = POLICIES["round-robin"](PolicyConfig())
    prefill, decode = [P("p1"), P("p0"), P("p2", alive=False)], [D("d0", 50), D("d1", 50)]
    routes = [policy(prefill, decode, Ask(10)) for _ in range(4)]
    assert [(r.prefill_id, r.decode_id) for r in routes] == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_prefix_aware_prefers_the_cached_worker_unless_it_is_much_busier():
    policy = prefix_aware(PolicyConfig(prefix_balance_requests=4))
    decode = [D("d0", 90), D("d1", 20, running=3)]
    assert policy([P("p0")], decode, Ask(320)) == Route("p0", "d0")  # nothing cached: most free blocks
    assert policy([P("p0")], decode, Ask(320, {"d1": 256})) == Route("p0", "d1")
    busy = [D("d0", 90), D("d1", 20, running=5)]
    assert policy([P("p0")], busy, Ask(320, {"d1": 256})) == Route("p0", "d0")  # 5 > 0 + 4 queued
    # the cached prefix needs no new blocks: 320 tokens with 256 cached fit in 4 free blocks
    assert policy([P("p0")], [D("d0", 4)], Ask(320, {"d0": 256})) == Route("p0", "d0")
    assert policy([P("p0")], [D("d0", 4)], Ask(320)) is None


def test_conditional_prefills_short_uncached_prompts_on_the_decode_worker():
    policy = conditional(PolicyConfig(local_prefill_tokens=512, prefill_full_tokens=4096))
    prefill, decode = [P("p0", 100), P("p1", 50)], [D("d0", 200)]
    assert policy(prefill, decode, Ask(511)) == Route(None, "d0")
    assert policy(prefill, decode, Ask(512)) == Route("p1", "d0")
    assert policy(prefill, decode, Ask(2000, {"d0": 1600})) == Route(None, "d0")  # 400 uncached
    saturated = [P("p0", 3000), P("p1", 3800)]  # 3000 + 1200 > 4096
    assert policy(saturated, decode, Ask(1200)) == Route(None, "d0")
    assert policy([P("p0", alive=False)], decode, Ask(1200)) == Route(None, "d0")
    assert policy(prefill, [D("d0", 2)], Ask(100)) is None


def test_mixed_pool_lends_a_worker_while_its_pool_is_idle_and_the_other_full():
    policy = MixedPool(PolicyConfig(prefill_full_tokens=1000))
    prefill, decode = [P("p0", 900)], [D("d0", 100), D("d1", 100, running=2)]
    assert policy(prefill, decode, Ask(50)) == Route("p0", "d0") and not policy.lent
    # p0 is full for 200 more tokens: the least loaded decode worker other than the decode target is lent
    assert policy(prefill, decode, Ask(200)) == Route("d1", "d0")
    assert policy.lent == {"d1": "prefill"}
    # while lent (busy), it takes prefills without being borrowed again; idle, it returns
    assert policy(prefill, [D("d0", 100), D("d1", 90, running=1)], Ask(200)) == Route("d1", "d0")
    assert policy([P("p0", 0)], [D("d0", 100), D("d1", 100)], Ask(200)) == Route("p0", "d0")
    assert not policy.lent
    # the decode pool is full: the prefill worker with room is lent to it
    full = [D("d0", 1), D("d1", 1)]
    assert policy([P("p0", 0, free=50), P("p1", 10, free=60)], full, Ask(100)) == Route("p0", "p1")
    assert policy.lent == {"p1": "decode"}
    # nothing to borrow: both phases on the decode worker
    lone = MixedPool(PolicyConfig(prefill_full_tokens=1000))
    assert lone([P("p0", 990)], [D("d0", 100)], Ask(200)) == Route(None, "d0")
    assert lone([P("p0")], [D("d0", 1)], Ask(200)) is None


def test_policies_import_no_torch_or_ray():
    code = "import sys, scheduler.policies, scheduler.controller, scheduler.router; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_kv_prediction_when_full_prefill_would_miss_the_ttft_slo():
    from scheduler.policies import use_kv_prediction

    def w(pending, rate=0.001, cost=0.5):
        return WorkerLoad("p0", pending_prefill_tokens=pending, prefill_s_per_token=rate, kv_prediction_cost=cost)

    assert not use_kv_prediction(w(0), 1000, slo_ttft_s=2.0)        # 1 s: meets it
    assert use_kv_prediction(w(1500), 1000, slo_ttft_s=2.0)         # 2.5 s behind the queue: misses
    assert use_kv_prediction(w(0), 3000, slo_ttft_s=2.0)            # a long prompt alone misses
    assert not use_kv_prediction(w(5000, cost=0), 1000, 2.0)        # no predictor
    assert not use_kv_prediction(w(5000, rate=0), 1000, 2.0)        # speed not measured yet
    assert not use_kv_prediction(w(0, cost=1.5), 3000, 2.0)         # a predictor dearer than prefill
