"""Routing policies on plain numbers; they import neither torch nor ray."""

import subprocess
import sys

from scheduler.policies import POLICIES, Route, WorkerLoad, join_shortest_queue


def P(wid, pending=0, running=0, alive=True):
    return WorkerLoad(wid, pending_prefill_tokens=pending, num_running=running, alive=alive)


def D(wid, free, running=0, alive=True):
    return WorkerLoad(wid, num_free_blocks=free, num_running=running, block_size=16, alive=alive)


def test_jsq_picks_least_pending_prefill_and_most_free_decode():
    route = join_shortest_queue([P("p0", 500), P("p1", 20), P("p2", 300)], [D("d0", 10), D("d1", 90)], 100)
    assert route == Route("p1", "d1")


def test_jsq_skips_dead_workers_and_decodes_without_room():
    prefill = [P("p0", 0, alive=False), P("p1", 900)]
    decode = [D("d0", 500, alive=False), D("d1", 6), D("d2", 7)]
    assert join_shortest_queue(prefill, decode, 100) == Route("p1", "d2")  # 100 tokens need 7 blocks
    assert join_shortest_queue(prefill, decode, 200) is None  # 13 blocks: nobody has room
    assert join_shortest_queue([P("p0", alive=False)], decode, 1) is None


def test_jsq_breaks_ties_by_load_then_id():
    assert join_shortest_queue([P("b", 5, running=1), P("a", 5, running=3)], [D("y", 9), D("x", 9)], 1) == \
        Route("b", "x")


def test_round_robin_cycles_live_workers():
    policy = POLICIES["round-robin"]()
    prefill, decode = [P("p1"), P("p0"), P("p2", alive=False)], [D("d0", 50), D("d1", 50)]
    routes = [policy(prefill, decode, 10) for _ in range(4)]
    assert [(r.prefill_id, r.decode_id) for r in routes] == [("p0", "d0"), ("p1", "d1"), ("p0", "d0"), ("p1", "d1")]


def test_policies_import_no_torch_or_ray():
    code = "import sys, scheduler.policies; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
