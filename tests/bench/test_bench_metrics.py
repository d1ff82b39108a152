"""bench's metric arithmetic and arrival processes against hand-computed cases."""

import statistics

import pytest

from bench.arrivals import arrival_times
from bench.metrics import SLO, RequestRecord, percentile, summarize


def rec(send, chunks, tokens, ok=True):
    return RequestRecord(send_s=send, chunk_s=chunks, output_tokens=tokens, ok=ok)


def test_per_request_latencies():
    r = rec(1.0, [1.2, 1.3, 1.5, 1.6], 4)
    assert r.ttft_s == pytest.approx(0.2)
    assert r.e2el_s == pytest.approx(0.6)
    assert r.tpot_s == pytest.approx((0.6 - 0.2) / 3)
    assert r.itl_s == pytest.approx([0.1, 0.2, 0.1])


def test_one_token_request_has_no_tpot_and_meets_any_tpot_slo():
    r = rec(0.0, [0.1], 1)
    assert r.tpot_s is None and r.itl_s == []
    assert SLO(ttft_ms=150, tpot_ms=1).met(r)
    assert not SLO(ttft_ms=50).met(r)


def test_percentiles_interpolate_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 99) == pytest.approx(3.97)
    assert percentile([5.0], 99) == 5.0 and percentile([], 50) is None


def test_summary_pools_itl_and_checks_slos_jointly():
    records = [
        rec(0.0, [0.1, 0.2, 0.3], 3),    # ttft 100 ms, tpot 100 ms: meets both
        rec(0.0, [0.4, 0.45, 0.5], 3),   # ttft 400 ms (miss), tpot 50 ms
        rec(1.0, [1.1, 1.5, 1.9], 3),    # ttft 100 ms, tpot 400 ms (miss)
        rec(2.0, [], 0, ok=False),        # failed: counted, never meets
    ]
    report = summarize(records, duration_s=4.0, slo=SLO(ttft_ms=200, tpot_ms=200))
    assert (report.num_ok, report.num_failed) == (3, 1)
    assert report.attainment == pytest.approx(1 / 4)
    assert report.goodput_rps == pytest.approx(1 / 4.0)
    assert report.request_throughput == pytest.approx(3 / 4.0)
    assert report.output_token_throughput == pytest.approx(9 / 4.0)
    # pooled ITL over all successful requests: 0.1 0.1 0.05 0.05 0.4 0.4
    assert report.itl_s.mean == pytest.approx(1.1 / 6)
    assert report.itl_s.median == pytest.approx(0.1)
    assert report.ttft_s.mean == pytest.approx(0.2)
    assert report.tpot_s.median == pytest.approx(0.1)
    assert summarize(records, 4.0).attainment is None  # no SLO given


def test_e2el_slo():
    r = rec(0.0, [0.1, 0.9], 2)
    assert SLO(e2el_ms=1000).met(r) and not SLO(e2el_ms=800).met(r)


@pytest.mark.parametrize("burstiness", [0.5, 1.0, 4.0])
def test_gamma_arrivals_have_the_asked_rate_and_cv(burstiness):
    times = arrival_times(20000, rate=5.0, burstiness=burstiness, seed=1)
    gaps = [b - a for a, b in zip([0.0] + times, times)]
    mean = statistics.fmean(gaps)
    cv = statistics.pstdev(gaps) / mean
    assert mean == pytest.approx(1 / 5.0, rel=0.05)
    assert cv == pytest.approx(burstiness ** -0.5, rel=0.05)
    assert times == arrival_times(20000, rate=5.0, burstiness=burstiness, seed=1)  # seeded
    assert times != arrival_times(20000, rate=5.0, burstiness=burstiness, seed=2)


def test_infinite_rate_sends_everything_at_once():
    assert arrival_times(3, float("inf")) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        arrival_times(3, 0)
