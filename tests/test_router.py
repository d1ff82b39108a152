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
