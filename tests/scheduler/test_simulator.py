"""The discrete-event simulator (scheduler/planner/simulator.py) on cases with known answers:
one worker and deterministic arrivals, batching, the disaggregated lifecycle, waiting for
decode blocks, and routing over several workers. Times are exact sums of the latency model."""

import pytest

from bench.metrics import SLO, summarize
from scheduler.planner.latency import Fit, LatencyModel
from scheduler.planner.simulator import SimConfig, SimRequest, Simulator

# prefill: 10 ms + 1 ms per token; decode step: 5 ms + 1 ms per request in the batch
FIT_P = Fit((0.010, 0.001, 0.0), 1.0, 10)
FIT_D = Fit((0.005, 0.0, 0.001), 1.0, 10)
MODEL = LatencyModel(FIT_P, FIT_D, FIT_D, 1000)


def P(n: int) -> float:
    return 0.010 + 0.001 * n


def D(batch: int) -> float:
    return 0.005 + 0.001 * batch


def test_one_request_on_one_colocated_worker():
    (record,) = Simulator(MODEL, SimConfig(colocated=True)).run([SimRequest(1.0, 100, 4)])
    expected = [1.0 + P(100) + i * D(1) for i in range(4)]
    assert record.chunk_s == pytest.approx(expected) and record.output_tokens == 4
    assert record.ttft_s == pytest.approx(P(100)) and record.tpot_s == pytest.approx(D(1))


def test_spaced_arrivals_each_see_an_idle_worker():
    requests = [SimRequest(10.0 * i, 50, 3) for i in range(5)]
    records = Simulator(MODEL, SimConfig(colocated=True)).run(requests)
    assert all(r.ttft_s == pytest.approx(P(50)) and r.tpot_s == pytest.approx(D(1)) for r in records)
    report = summarize(records, 50.0, SLO(ttft_ms=P(50) * 1000 + 1, tpot_ms=D(1) * 1000 + 1))
    assert report.attainment == 1.0 and report.num_ok == 5


def test_simultaneous_requests_are_batched():
    a, b = Simulator(MODEL, SimConfig(colocated=True)).run([SimRequest(0.0, 100, 3), SimRequest(0.0, 50, 3)])
    first = P(150)  # one step prefills both prompts
    assert a.ttft_s == pytest.approx(first) and b.ttft_s == pytest.approx(first)
    assert a.chunk_s[1:] == pytest.approx([first + D(2), first + 2 * D(2)])  # then they decode together


def test_a_token_budget_chunks_a_long_prompt():
    (record,) = Simulator(MODEL, SimConfig(colocated=True, max_num_batched_tokens=64)).run(
        [SimRequest(0.0, 100, 2)])
    assert record.ttft_s == pytest.approx(P(64) + P(36))  # two chunks


def test_disaggregated_lifecycle_adds_the_exposed_transfer():
    config = SimConfig(transfer_s_per_token=1e-4)
    (record,) = Simulator(MODEL, config).run([SimRequest(0.0, 100, 3)])
    ttft = P(100) + 100 * 1e-4  # prefill on the prefill worker, then the KV lands on the idle decode worker
    assert record.chunk_s == pytest.approx([ttft, ttft + D(1), ttft + 2 * D(1)])


def test_no_decode_worker_with_room_refuses_like_the_live_503():
    # 8 blocks of 16 tokens: one 100-token prompt (7 blocks) at a time
    first, second = Simulator(MODEL, SimConfig(num_blocks=8, block_size=16)).run([SimRequest(0.0, 100, 3), SimRequest(0.0, 100, 3)])
    assert first.ok and first.output_tokens == 3
    assert not second.ok and second.error == "no route"


def test_a_prompt_arriving_later_joins_the_running_batch():
    sim = Simulator(MODEL, SimConfig(colocated=True))
    a, b = sim.run([SimRequest(0.0, 100, 5), SimRequest(P(100) + 0.001, 20, 2)])
    # b arrives during a's first decode step; the next step prefills b and decodes a together
    t = P(100) + D(1)
    mixed = P(20) + D(1) - 0.005  # one fixed cost for a mixed step
    assert b.ttft_s == pytest.approx(t + mixed - (P(100) + 0.001))
    assert a.chunk_s[2] == pytest.approx(t + mixed)


def test_jsq_spreads_requests_over_both_pools():
    sim = Simulator(MODEL, SimConfig(num_prefill=2, num_decode=2))
    records = sim.run([SimRequest(0.001 * i, 200, 4) for i in range(8)])
    assert all(r.ok and r.output_tokens == 4 for r in records)
    assert set(sim.router.num_routed) == {"prefill-0", "prefill-1", "decode-0", "decode-1"}


def test_one_token_requests_finish_at_their_first_token():
    (record,) = Simulator(MODEL, SimConfig()).run([SimRequest(0.0, 30, 1)])
    assert record.output_tokens == 1 and record.ttft_s == pytest.approx(P(30)) and record.tpot_s is None


def test_conditional_prefills_short_prompts_on_the_decode_worker():
    from scheduler.policies import PolicyConfig

    config = SimConfig(policy="conditional", policy_config=PolicyConfig(local_prefill_tokens=64),
                       transfer_s_per_token=1e-4)
    short, long = Simulator(MODEL, config).run([SimRequest(0.0, 40, 3), SimRequest(10.0, 100, 3)])
    # short: no transfer, no hop; prefilled and decoded on decode-0 as colocated
    assert short.ttft_s == pytest.approx(P(40)) and short.chunk_s[1] - short.chunk_s[0] == pytest.approx(D(1))
    # long: prefilled remotely, exposed transfer, first token at the decode worker's next step boundary
    assert long.ttft_s == pytest.approx(P(100) + 100 * 1e-4)


def test_the_mixed_pool_borrows_a_decode_worker_for_prefill_when_the_prefill_pool_is_full():
    from scheduler.policies import PolicyConfig

    config = SimConfig(num_prefill=1, num_decode=2, policy="mixed", policy_config=PolicyConfig(prefill_full_tokens=150))
    a, b = Simulator(MODEL, config).run([SimRequest(0.0, 100, 2), SimRequest(0.0, 100, 2)])
    # prefill-0 holds 100 pending tokens, 100 more would exceed 150: decode-1 is lent and prefills b,
    # so both prompts are computed at once on two workers instead of one after the other
    assert a.ttft_s == pytest.approx(P(100)) and b.ttft_s == pytest.approx(P(100))
    jsq = Simulator(MODEL, SimConfig(num_prefill=1, num_decode=2)).run([SimRequest(0.0, 100, 2), SimRequest(0.0, 100, 2)])
    assert max(r.ttft_s for r in jsq) == pytest.approx(P(200))  # one prefill worker batches both prompts


def test_whole_and_layered_schedules_time_their_steps():
    # whole: a 100-token prompt in one step even over a 64-token budget (it runs alone)
    whole = SimConfig(colocated=True, max_num_batched_tokens=64, prefill_schedule="whole")
    (record,) = Simulator(MODEL, whole).run([SimRequest(0.0, 100, 2)])
    assert record.ttft_s == pytest.approx(P(100))
    # layered over 4 layers: 100 tokens make one group (the table's first row), so the cohort
    # goes through all 4 layers in one step; over 2048 tokens, 4 groups of a quarter each
    layered = SimConfig(colocated=True, prefill_schedule="layered", num_layers=4)
    (record,) = Simulator(MODEL, layered).run([SimRequest(0.0, 100, 2)])
    assert record.ttft_s == pytest.approx(P(100))
    (record,) = Simulator(MODEL, layered).run([SimRequest(0.0, 2048, 2)])
    assert record.ttft_s == pytest.approx(4 * (0.010 + 0.001 * 2048 / 4))


@pytest.mark.parametrize("schedule", ["whole", "chunked", "layered"])
def test_a_long_prompt_stalls_the_decoders_least_under_chunked_and_layered(schedule):
    """The interference case: 8 requests decode, a 2048-token prompt arrives."""
    config = SimConfig(colocated=True, prefill_schedule=schedule, token_budget=256, num_layers=32)
    records = Simulator(MODEL, config).run([SimRequest(0.0, 16, 40) for _ in range(8)] + [SimRequest(0.1, 2048, 2)])
    gap = max(b - a for r in records[:8] for a, b in zip(r.chunk_s, r.chunk_s[1:]))
    assert gap == pytest.approx(P(2048) + D(8) - 0.005) if schedule == "whole" else gap < P(2048) / 2
