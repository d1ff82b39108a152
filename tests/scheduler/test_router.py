"""Routing without Ray: the Router's view and charging, and the global scheduler's registry,
polls, failures and restarts against a fake load client."""

from scheduler.global_scheduler import GlobalScheduler, WorkerInfo
from scheduler.policies import WorkerLoad
from scheduler.router import Router, WorkerView


def view(worker_id, role, free=100, pending=0, alive=True):
    return WorkerView(worker_id, role, f"{worker_id}:1", WorkerLoad(worker_id, pending_prefill_tokens=pending,
                                                                     num_free_blocks=free, alive=alive), free)


def test_a_burst_spreads_over_both_pools():
    router = Router("jsq")
    router.update([view("p0", "prefill"), view("p1", "prefill"), view("d0", "decode"), view("d1", "decode")])
    targets = [router.route(160) for _ in range(8)]  # 10 blocks each, no refresh in between
    assert sorted(t.prefill_id for t in targets) == ["p0"] * 4 + ["p1"] * 4
    assert sorted(t.decode_id for t in targets) == ["d0"] * 4 + ["d1"] * 4
    assert router.num_routed == {"p0": 4, "p1": 4, "d0": 4, "d1": 4}
    assert router.views["d0"].load.num_free_blocks == 60


def test_dead_or_full_workers_are_skipped_and_none_means_no_route():
    router = Router("jsq")
    router.update([view("p0", "prefill", alive=False), view("p1", "prefill", pending=10_000),
                   view("d0", "decode", free=5), view("d1", "decode", free=50)])
    assert router.route(160).prefill_id == "p1" and router.route(160).decode_id == "d1"
    router.set_alive("p1", False)
    assert router.route(16) is None
    assert router.another_prefill(["p1:1"]) is None
    router.set_alive("p0", True)
    assert router.another_prefill(["p1:1"]).worker_id == "p0"


def test_a_decode_worker_without_free_blocks_takes_what_its_queue_can_hold():
    router = Router("jsq")
    full = WorkerView("d0", "decode", "d0:1", WorkerLoad("d0", num_free_blocks=0, wait_room=2), 100)
    router.update([view("p0", "prefill"), full])
    assert [router.route(16) is not None for _ in range(3)] == [True, True, False]
    assert router.views["d0"].load.num_waiting == 2
    assert router.why_no_route() == "no decode worker has room for this prompt now"
    router.set_alive("p0", False)
    assert router.why_no_route() == "no prefill worker is up"
    router.set_alive("d0", False)
    assert router.why_no_route() == "no decode worker is up"


class FakeLoads:
    def __init__(self):
        self.answers = {}
        self.forgotten = []

    def poll(self, addresses, timeout_s):
        return {a: self.answers.get(a, RuntimeError("unreachable")) for a in addresses}

    def forget(self, address):
        self.forgotten.append(address)


class Late(Exception):
    """What a poll that timed out raises (a grpc.RpcError with DEADLINE_EXCEEDED)."""

    def code(self):
        return type("Code", (), {"name": "DEADLINE_EXCEEDED"})()


def info(worker_id, role, address, incarnation="a", max_len=512):
    return WorkerInfo(worker_id, role, address, incarnation, 1, max_len, 1000, 16, 64)


def alive(scheduler):
    return {w["worker_id"]: w["alive"] for w in scheduler.workers()}


def test_scheduler_registry_polls_failures_and_restarts():
    loads = FakeLoads()
    s = GlobalScheduler("jsq", poll_interval_s=3600, max_missed_polls=3, load_client=loads)  # polled by hand
    ok = lambda wid, inc="a": (WorkerLoad(wid, num_free_blocks=64), inc)  # noqa: E731
    loads.answers = {"p:1": ok("p0"), "d:1": ok("d0")}
    s.register(info("p0", "prefill", "p:1"))
    s.register(info("d0", "decode", "d:1", max_len=256))
    assert s.model_limits() == (256, 1000)
    target = s.route(40)
    assert (target.prefill_id, target.decode_id, target.decode_address) == ("p0", "d0", "d:1")
    loads.answers["d:1"] = Late()  # a busy worker answering late is still routed to, for a while
    s.poll_once()
    s.poll_once()
    assert alive(s)["d0"]
    s.poll_once()
    assert not alive(s)["d0"] and s.route(40) is None
    loads.answers["d:1"] = ok("d0")  # it answers again
    s.poll_once()
    assert alive(s)["d0"]
    del loads.answers["d:1"]  # cannot be reached: out at once
    s.poll_once()
    assert not alive(s)["d0"]
    loads.answers["d:1"] = ok("d0")
    s.poll_once()
    s.report_failure("d0", "stale:9")  # a report about an older incarnation changes nothing
    assert alive(s)["d0"]
    s.report_failure("d0", "d:1")
    assert not alive(s)["d0"] and s.workers()[0]["num_failures"] == 3
    # Ray restarted it: a new address and incarnation replace the entry
    loads.answers["d:2"] = ok("d0", "b")
    s.register(info("d0", "decode", "d:2", incarnation="b"))
    assert loads.forgotten == ["d:1"] and s.route(40).decode_address == "d:2"
    assert s.reroute_prefill([("p0", "p:1")]) is None and not alive(s)["p0"]
    s.register(info("p0", "prefill", "p:2", incarnation="b"))  # restarted: another worker for a retry
    assert s.reroute_prefill([("p0", "p:1")]) == ("p0", "p:2")
    s.stop()


def test_scheduler_snapshot_feeds_a_replica():
    s = GlobalScheduler("round-robin", poll_interval_s=10, load_client=FakeLoads())
    s.register(info("p0", "prefill", "p:1"))
    s.register(info("d0", "decode", "d:1"))
    replica = Router("round-robin")
    replica.update(s.snapshot())
    assert replica.route(10).decode_address == "d:1"
    s.count_routes(replica.num_routed)
    assert [w["num_routed"] for w in s.workers()] == [1, 1]
    s.stop()


def test_prefix_routing_remembers_what_each_decode_worker_was_sent():
    from engine.kv.prefix_hash import prompt_block_hashes as block_hashes
    from scheduler.policies import PolicyConfig
    from scheduler.router import PrefixIndex

    router = Router("prefix", PolicyConfig(prefix_balance_requests=100))
    router.update([view("p0", "prefill"), view("d0", "decode", free=200), view("d1", "decode", free=100)])
    system = list(range(64))  # a shared 4-block system prompt
    first = router.route(80, system + [1] * 16)
    assert first.decode_id == "d0"  # nothing cached anywhere: most free blocks
    router.put(view("d0", "decode", free=50))  # d0 now has the fewest free blocks...
    again = router.route(72, system + [2] * 8)
    assert again.decode_id == "d0"  # ...but holds the prefix
    # charged only for the uncached blocks: 72 tokens, 64 cached -> 1 block
    assert router.views["d0"].load.num_free_blocks == 49
    assert router.route(72, [5] * 72).decode_id == "d1"  # another prefix: JSQ
    assert block_hashes(list(range(33)), 16) == block_hashes(list(range(48)), 16)[:2]  # the last token is not hashed
    index = PrefixIndex(capacity=2)
    index.add([1, 2, 3])
    assert index.match([2, 3]) == 2 and index.match([1, 2]) == 0  # block 1 was forgotten first


def test_local_prefill_targets_and_pool_moves():
    from scheduler.policies import PolicyConfig

    router = Router("conditional", PolicyConfig(local_prefill_tokens=100))
    router.update([view("p0", "prefill"), view("d0", "decode")])
    local = router.route(50, [3] * 50)
    assert local.local and local.prefill_id == "" and local.decode_id == "d0" and router.num_local == 1
    assert router.views["d0"].load.pending_prefill_tokens == 50  # the decode worker prefills it
    assert router.route(150, [4] * 150).prefill_id == "p0"
    assert router.set_role("p0", "decode") and not router.set_role("p0", "decode")
    assert router.route(150, [7] * 150).local  # no prefill pool left: the decode worker prefills


def test_a_route_asked_local_charges_the_decode_worker_the_whole_prompt():
    """Prompt logprobs come from the forward over the prompt: its decode worker computes all of
    it, and only it is charged (no prefill worker's queue grows)."""
    router = Router("prefix")
    router.update([view("p0", "prefill"), view("d0", "decode")])
    assert router.route(64, [5] * 64).prefill_id == "p0"  # d0 now likely caches these 4 blocks
    pending = router.views["p0"].load.pending_prefill_tokens
    target = router.route(64, [5] * 64, local=True)
    assert target.local and target.decode_id == "d0" and router.num_local == 1
    assert router.views["d0"].load.pending_prefill_tokens == 64  # no cached prefix counts
    assert router.views["p0"].load.pending_prefill_tokens == pending


def test_the_scheduler_runs_the_role_controller_and_reports_its_moves():
    from scheduler.controller import ControllerConfig, RoleController

    controller = RoleController(1.0, 0.1, ControllerConfig(patience=1, min_samples=5))
    s = GlobalScheduler("jsq", poll_interval_s=3600, load_client=FakeLoads(), controller=controller)
    s.register(info("p0", "prefill", "p:1"))
    s.register(info("d0", "decode", "d:1"))
    s.register(info("d1", "decode", "d:2"))
    assert s.control_status()["verdict"] == "few-samples"
    s.report_latencies([(3.0, 0.01)] * 10)  # TTFT misses, TPOT has slack
    decision = s.control_once()
    assert decision.move == ("d0", "prefill") and decision.ttft_s == 3.0
    assert {w["worker_id"]: (w["role"], w["home"]) for w in s.workers()} == {
        "p0": ("prefill", "prefill"), "d0": ("prefill", "decode"), "d1": ("decode", "decode")}
    assert [v.role for v in s.snapshot() if v.worker_id == "d0"] == ["prefill"]  # replicas route the same
    assert s.control_status() == {"verdict": "need-prefill", "ttft_s": 3.0, "tpot_s": 0.01,
                                  "moves": {"prefill": 1, "decode": 0}}
    assert s.control_once().verdict == "few-samples"  # the window's samples were used up
    s.stop()
