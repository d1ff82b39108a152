"""The semi-PD split controller on a synthetic latency model: it converges to a split that meets
both SLOs, holds when both miss, and never leaves its bounds or moves more than max_step."""

import pytest

from engine.worker.split_controller import InverseModel, SplitController, SplitControllerConfig, WindowStats

RATE, L100 = 0.5, 0.2  # beta = 100 * 0.5 * 0.2 = 10 % of the device only keeps up with arrivals


def true_ttft(x: float) -> float:
    return float("inf") if x <= 10 else 30 / (x - 10) + 0.2


def true_tpot(y: float) -> float:
    return 4 / y + 0.02


def window(share: float, spread: float = 0.0) -> WindowStats:
    """Eight requests around the system's true latencies at this split."""
    jitter = [1 - spread, 1, 1 + spread / 2, 1, 1 - spread / 2, 1, 1 + spread, 1]
    ttft, tpot = min(true_ttft(share), 1e6), true_tpot(100 - share)
    return WindowStats([ttft * j for j in jitter], [tpot * j for j in jitter], RATE, L100)


def run(controller: SplitController, windows: int = 12, spread: float = 0.0) -> list[float]:
    shares = [controller.share]
    for _ in range(windows):
        controller.update(window(controller.share, spread))
        shares.append(controller.share)
    return shares


@pytest.mark.parametrize("start", [15.0, 20.0, 50.0, 85.0])
@pytest.mark.parametrize("spread", [0.0, 0.1])
def test_converges_to_a_split_meeting_both_slos(start, spread):
    # TTFT <= 1.0 needs x >= 47.5; TPOT <= 0.1 needs y >= 50, i.e. x <= 50
    controller = SplitController(1.0 * (1 + spread), 0.1 * (1 + spread), share=start)
    shares = run(controller, spread=spread)
    assert shares[-1] == shares[-2] == shares[-3]  # settled
    assert 45 <= shares[-1] <= 50 + 100 * spread
    assert controller.last.verdict == "ok"


def test_fits_the_model_and_jumps_in_one_decision_when_it_can():
    controller = SplitController(1.0, 0.1, SplitControllerConfig(max_step=8), share=20)
    controller.update(window(20))  # one point: b = 0, the model overestimates: a long stride
    controller.update(window(controller.share))
    assert controller.ttft_model.a == pytest.approx(30) and controller.ttft_model.b == pytest.approx(0.2)
    assert controller.share == 50


def test_holds_when_both_slos_miss():
    controller = SplitController(0.3, 0.05, share=40)  # neither can be met: both miss at every split
    shares = run(controller, windows=5)
    assert shares == [40] * 6 and controller.last.verdict == "both-miss"


@pytest.mark.parametrize("slos, bound", [((0.21, 1.0), 80.0), ((100.0, 0.021), 20.0)])
def test_respects_bounds_and_max_step(slos, bound):
    """An SLO only the extreme split could meet: the share walks to its bound at most
    step * max_step per decision, and stays there."""
    cfg = SplitControllerConfig(step=5, max_step=3, min_share=20, max_share=80)
    controller = SplitController(*slos, cfg, share=50)
    shares = run(controller, windows=10)
    assert all(20 <= s <= 80 for s in shares)
    assert all(abs(b - a) <= 15 for a, b in zip(shares, shares[1:]))
    assert shares[-1] == bound


def test_few_samples_hold_and_validation():
    controller = SplitController(1.0, 0.1, share=30)
    assert controller.update(WindowStats([5.0, 5.0], [0.5], RATE, L100)).verdict == "few-samples"
    assert controller.share == 30
    assert SplitController(1.0, 0.1, share=99).share == 90  # clamped into its bounds
    for bad in (dict(min_share=0), dict(min_share=60, max_share=50), dict(step=0), dict(window=0)):
        with pytest.raises(ValueError):
            SplitControllerConfig(**bad)


def test_inverse_model_keeps_a_falling_curve():
    model = InverseModel(8)
    model.add(50, 1.0)
    assert (model.a, model.b) == (50, 0)
    model.add(25, 0.5)  # latency falling with less share: not the model's shape, refit through 0
    assert model.a > 0 and model.b == 0
