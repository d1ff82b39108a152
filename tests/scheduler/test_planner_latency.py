"""DistServe's latency model (scheduler/planner/latency.py) on numbers with known answers,
and `pdserve profile` on a tiny model: it measures, fits, and round-trips its JSON."""

import json
import random

import pytest

from scheduler.planner.latency import DecodeSample, Fit, PrefillSample, Profile, fit_linear, fit_model, prefill_features


def test_a_fit_recovers_known_coefficients_with_r2_one():
    rng = random.Random(0)
    samples = [tuple(rng.randint(1, 512) for _ in range(rng.randint(1, 4))) for _ in range(30)]
    truth = (0.01, 2e-4, 3e-7)
    seconds = [truth[0] + truth[1] * sum(s) + truth[2] * sum(n * n for n in s) for s in samples]
    fit = fit_linear([prefill_features(s) for s in samples], seconds)
    assert fit.coef == pytest.approx(truth, rel=1e-6) and fit.r2 == pytest.approx(1.0) and fit.num_points == 30


def test_a_term_that_would_be_negative_is_dropped_and_the_rest_refitted():
    # y = 1 + 2*x1 exactly, with x2 anti-correlated noise that plain least squares would use
    xs = [(float(i), float((i * 7) % 5)) for i in range(10)]
    ys = [1 + 2 * x1 - 0.01 * x2 for x1, x2 in xs]
    fit = fit_linear(xs, ys)
    assert min(fit.coef) >= 0 and fit.coef[2] == 0
    assert fit.r2 > 0.99


def test_a_noisy_outlier_is_dropped_but_honest_scatter_is_kept():
    xs = [(float(c * b), float(b)) for c in (100, 500, 1000) for b in (1, 2, 4, 8)]
    truth = [0.05 + 2e-5 * x1 for x1, _ in xs]
    wobble = [t * (1 + 0.03 * ((-1) ** i)) for i, t in enumerate(truth)]  # +-3 %: every point stays
    assert fit_linear(xs, wobble).num_points == 12
    hit = list(wobble)
    hit[9] = 2.5 * truth[9]  # one measurement taken while a neighbour hogged the cores
    fit = fit_linear(xs, hit)
    assert fit.num_points == 11 and fit.r2 > 0.95
    assert fit.coef[:2] == pytest.approx((0.05, 2e-5), rel=0.1)


def test_a_fit_needs_three_points():
    with pytest.raises(ValueError, match="at least 3"):
        fit_linear([(1, 1), (2, 4)], [1, 2])


def test_decode_has_small_and_large_batch_fits():
    small = [DecodeSample((c,) * b, 0.01 + 1e-5 * c * b + 1e-3 * b) for b in (1, 2, 4) for c in (10, 100)]
    large = [DecodeSample((c,) * b, 0.05 + 1e-6 * c * b + 1e-4 * b) for b in (16, 32) for c in (10, 100)]
    prefill = [PrefillSample((n,), 0.001 * n) for n in (8, 16, 32, 64)]
    model = fit_model(prefill, small + large, large_batch_from=16)
    assert model.decode_s((100,) * 2) == pytest.approx(0.01 + 2e-3 + 2e-3)
    assert model.decode_s((100,) * 32) == pytest.approx(0.05 + 3.2e-3 + 3.2e-3)
    assert model.prefill_s([64]) == pytest.approx(0.064) and model.prefill_s([]) == 0.0


@pytest.mark.slow
def test_profile_a_tiny_model(tiny_llama, tmp_path):
    from bench.lab.latency_profile import main
    out = tmp_path / "tiny.json"
    assert main(["--model", str(tiny_llama), "--quick", "--num-threads", "1", "--out", str(out)]) == 0
    profile = Profile.load(out)
    assert json.loads(out.read_text())["model"] == tiny_llama.name
    cfg = json.loads((tiny_llama / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    assert profile.kv_bytes_per_token == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * 4
    assert len(profile.prefill_samples) == 8 and len(profile.decode_samples) == 8
    assert all(s.seconds > 0 for s in profile.prefill_samples + profile.decode_samples)
    for fit in (profile.latency.prefill, profile.latency.decode_small):
        assert isinstance(fit, Fit) and min(fit.coef) >= 0 and fit.r2 <= 1
    assert Profile.from_dict(json.loads(profile.to_json())) == profile
    assert main(["--refit", "--out", str(out)]) == 0  # from the stored samples: the same fit
    assert Profile.load(out) == profile


def test_the_planner_imports_no_torch_or_ray():
    import subprocess
    import sys
    code = "import sys, scheduler.planner.latency; assert 'torch' not in sys.modules and 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
