"""The role controller as a pure function, on a synthetic latency model: 8 workers, TTFT
falls with prefill workers and TPOT with decode workers."""

import random

from bench.metrics import percentile
from engine.worker.split_controller import SplitController, SplitControllerConfig, WindowStats
from scheduler.controller import ControllerConfig, RoleController
from scheduler.policies import WorkerLoad


def quantile(values, q):
    return percentile(values, q * 100)

SLO_TTFT, SLO_TPOT = 1.0, 0.1


def latencies(num_prefill: int, num_decode: int, n: int = 40) -> tuple[list[float], list[float]]:
    """Synthetic windows (p90 = 1.4 x base): base TTFT 2 s / prefill workers, base TPOT 0.2 s / decode
    workers; with 8 workers only 3P5D and 4P4D meet both SLOs."""
    ttft = 2.0 / num_prefill if num_prefill else 1e9
    tpot = 0.2 / num_decode if num_decode else 1e9
    return [ttft * (0.5 + i / n) for i in range(n)], [tpot * (0.5 + i / n) for i in range(n)]


def run(controller: RoleController, pools: dict[str, str], windows: int, model=latencies) -> list:
    moves = []
    for _ in range(windows):
        prefill = [WorkerLoad(w) for w, pool in sorted(pools.items()) if pool == "prefill"]
        decode = [WorkerLoad(w) for w, pool in sorted(pools.items()) if pool == "decode"]
        decision = controller.decide(*model(len(prefill), len(decode)), prefill, decode)
        if decision.move:
            pools[decision.move[0]] = decision.move[1]
            moves.append(decision.move)
    return moves


def test_converges_to_pools_that_meet_both_slos_and_stays():
    pools = {f"w{i}": "prefill" if i < 1 else "decode" for i in range(8)}  # 1P7D: p90 TTFT 2.8 s misses
    controller = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(patience=2, cooldown=1))
    moves = run(controller, pools, windows=40)
    num_prefill = sum(pool == "prefill" for pool in pools.values())
    ttft, tpot = latencies(num_prefill, 8 - num_prefill)
    assert quantile(ttft, 0.9) <= SLO_TTFT and quantile(tpot, 0.9) <= SLO_TPOT
    assert all(to == "prefill" for _, to in moves) and len(moves) == num_prefill - 1
    assert run(controller, pools, windows=20) == []  # converged: no more moves
    assert controller.decide(*latencies(num_prefill, 8 - num_prefill), [], []).verdict == "ok"


def test_hysteresis_waits_for_patience_and_cooldown():
    pools = {f"w{i}": "prefill" if i < 1 else "decode" for i in range(8)}
    controller = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(patience=3, cooldown=2))
    decisions = []
    for _ in range(8):
        prefill = [WorkerLoad(w) for w, p in sorted(pools.items()) if p == "prefill"]
        decode = [WorkerLoad(w) for w, p in sorted(pools.items()) if p == "decode"]
        d = controller.decide(*latencies(1, 7), prefill, decode)  # the same missing window every time
        decisions.append(d.move is not None)
        if d.move:
            pools[d.move[0]] = d.move[1]
    # a move after 3 agreeing windows, then 2 windows of cooldown, then 3 more agreeing windows
    assert decisions == [False, False, True, False, False, True, False, False]


def test_holds_when_both_slos_miss_or_samples_are_few():
    controller = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(patience=1))
    pools = [WorkerLoad("p0")], [WorkerLoad("d0"), WorkerLoad("d1")]
    both = ([5.0] * 20, [0.5] * 20)
    for _ in range(5):
        d = controller.decide(*both, *pools)
        assert d.verdict == "both-miss" and d.move is None
    assert controller.decide([5.0] * 3, [0.01] * 3, *pools).verdict == "few-samples"
    # TTFT misses but TPOT has no slack (above 0.8 x SLO): giving away a decode worker would break it
    assert controller.decide([5.0] * 20, [0.09] * 20, *pools).move is None


def test_respects_its_bounds_and_picks_the_least_loaded_live_donor():
    controller = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(patience=1, cooldown=0, min_per_pool=1))
    prefill = [WorkerLoad("p0")]
    decode = [WorkerLoad("d0", num_running=5), WorkerLoad("d1", num_running=1), WorkerLoad("d2", alive=False)]
    assert controller.decide([5.0] * 20, [0.01] * 20, prefill, decode).move == ("d1", "prefill")
    # TPOT misses with one prefill worker: the prefill pool keeps its last worker
    assert controller.decide([0.1] * 20, [0.5] * 20, prefill, decode).move is None
    # one live decode worker left (d2 is dead): the decode pool keeps it
    assert controller.decide([5.0] * 20, [0.01] * 20, prefill, [WorkerLoad("d0"), WorkerLoad("d2", alive=False)]
                             ).move is None


def test_quantile_matches_linear_interpolation():
    assert quantile([1, 2, 3, 4], 0.5) == 2.5 and quantile([3, 1, 2], 0.9) == 2.8 and quantile([7], 0.9) == 7


def test_the_bench_and_both_controllers_report_the_same_windowed_p90():
    rng = random.Random(0)
    ttft, tpot = [rng.uniform(0.1, 3.0) for _ in range(37)], [rng.uniform(0.01, 0.3) for _ in range(37)]
    role = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(min_samples=1)).decide(
        ttft, tpot, [WorkerLoad("p0")], [WorkerLoad("d0")])
    split = SplitController(SLO_TTFT, SLO_TPOT, SplitControllerConfig(min_samples=1)).update(WindowStats(ttft, tpot))
    assert role.ttft_s == split.ttft_s == percentile(ttft, 90)
    assert role.tpot_s == split.tpot_s == percentile(tpot, 90)


def test_low_rates_pool_windows_until_enough_samples():
    pools = [WorkerLoad("p0")], [WorkerLoad("d0"), WorkerLoad("d1")]
    controller = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(min_samples=10, max_windows=4, patience=2))
    few = ([5.0] * 4, [0.01] * 4)  # 4 finished requests a window, each a TTFT miss with TPOT slack
    decisions = [controller.decide(*few, *pools) for _ in range(6)]
    assert [d.verdict for d in decisions] == ["few-samples", "few-samples", "need-prefill"] * 2
    assert [d.move for d in decisions] == [None] * 5 + [("d0", "prefill")]  # 2 pooled verdicts agreed

    quiet = RoleController(SLO_TTFT, SLO_TPOT, ControllerConfig(min_samples=10, max_windows=3, patience=2))
    assert quiet.decide([5.0] * 10, [0.01] * 10, *pools).verdict == "need-prefill"  # streak 1
    for _ in range(3):  # then 1 request a window: never 10 in 3 windows, and the streak ends
        assert quiet.decide([5.0], [0.01], *pools).verdict == "few-samples"
    assert quiet.decide([5.0] * 10, [0.01] * 10, *pools).move is None  # streak 1 again, not 2
