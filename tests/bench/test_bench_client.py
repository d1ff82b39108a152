"""bench's client and phase runner against pdserve (tiny model) and a misbehaving stub."""

import asyncio

import pytest

from bench.datasets import BenchRequest
from bench.runner import Phase, PhaseState, run_phase

from bench_stub import stub_app
from helpers import free_port, serving


def run(url, prompts, max_tokens, arrivals=None, endpoint="completions", model=None, **kw):
    """Records in request order (the runner appends them as they finish, with their index)."""
    requests = [BenchRequest(p, max_tokens, 1) for p in prompts]
    phase = Phase("t", url, endpoint, model, 1.0, requests, arrivals or [0.0] * len(prompts), **kw)
    seen = []
    state = asyncio.run(run_phase(PhaseState(phase, on_change=lambda s: seen.append(len(s.records)))))
    assert seen[-1] == len(state.records)  # progress was reported as requests finished
    return sorted(state.records, key=lambda r: r.index), state


def test_every_request_against_pdserve_is_accounted_for(tiny_server):
    for endpoint in ("completions", "chat"):
        records, state = run(tiny_server.url, ["Once upon a time"] * 6, 5, endpoint=endpoint, model="tiny",
                             max_concurrency=3, timeout_s=60)
        assert len(records) == 6 and state.elapsed_s > 0
        assert all(r.ok for r in records), [r.error for r in records]
        assert all(r.output_tokens == 5 and r.ttft_s > 0 and r.e2el_s >= r.ttft_s for r in records)
        # pdserve answers the timings header with each request's phases, which add up to its life
        for r in records:
            assert set(r.timings) >= {"queue", "prefill", "decode"}
            assert sum(r.timings.values()) <= r.e2el_s + 0.05


@pytest.fixture(scope="module")
def stub():
    with serving(stub_app()) as url:
        yield url


def test_misbehaving_server_failures_are_counted_with_reasons(stub):
    prompts = ["ok", "slow", "500", "cut", "error", "hang", "ok"]
    records, state = run(stub, prompts, 3, [0.0] * 6 + [0.1], timeout_s=1.5)
    assert len(records) == 7 and state.sent == 7 and state.num_failed == 4
    by_prompt = dict(zip(prompts, records))
    assert [r.index for r in records] == list(range(7))
    assert by_prompt["ok"].output_tokens == 3 and len(by_prompt["ok"].chunk_s) == 3
    assert by_prompt["slow"].ok and by_prompt["slow"].ttft_s >= 0.3
    # the stub sleeps 50 ms between its 3 tokens, so the last cannot arrive sooner than 0.1 s after
    # sending (a gap between two reads can shrink when the client reads one late under load)
    ok = by_prompt["ok"]
    assert ok.e2el_s >= 0.1 and ok.tpot_s == pytest.approx((ok.e2el_s - ok.ttft_s) / 2)
    assert "HTTP 500" in by_prompt["500"].error
    assert "before [DONE]" in by_prompt["cut"].error
    assert "engine died" in by_prompt["error"].error
    assert "timed out after 1.5 s" in by_prompt["hang"].error
    assert records[6].ok and records[6].send_s >= 0.1  # sent at its arrival time


def test_connection_refused_is_a_failure_not_a_crash():
    records, _ = run(f"http://127.0.0.1:{free_port()}", ["x", "x"], 2, timeout_s=5)
    assert [r.ok for r in records] == [False, False] and all("Connect" in r.error for r in records)


def test_duration_stops_sending():
    records, state = run("http://127.0.0.1:1", ["x"] * 3, 2, [0.0, 0.5, 0.6], duration_s=0.2, timeout_s=2)
    assert state.sent == 1 and len(records) == 1
