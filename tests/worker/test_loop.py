"""The engine loop thread: outputs reach their sinks, a failing step fails only the
requests in flight (blocks freed) and the worker keeps serving; idle means asleep."""

import queue
import threading

import pytest

from engine.errors import EngineError, RequestError
from engine.sampling_params import SamplingParams
from engine.worker.loop import EngineLoop

from helpers import assert_no_leak, stalled, unchecked, wait_for


@pytest.fixture
def worker(tiny_llama, make_engine):
    w = EngineLoop(make_engine(model=str(tiny_llama))).start()
    yield w
    w.shutdown()
    assert not w._thread.is_alive()


def collect(worker, rid, prompt, params, timeout_s=30):
    q: queue.Queue = queue.Queue()
    worker.submit(rid, prompt, params, q.put)
    items = []
    while True:
        item = q.get(timeout=timeout_s)
        items.append(item)
        if isinstance(item, Exception) or item.finished:
            return items


def test_outputs_reach_the_sink(worker):
    items = collect(worker, "a", [5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))
    assert [len(o.new_token_ids) for o in items] == [1] * 5 and items[-1].finish_reason == "length"


def test_a_failing_step_fails_requests_in_flight_and_frees_their_blocks(worker):
    runner = worker.engine.runner
    real = runner.execute
    calls = {"n": 0}

    def flaky(plan, layer_done=None, runs=()):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated kernel failure")
        return real(plan, layer_done, runs)

    runner.execute = flaky
    items = collect(worker, "doomed", list(range(3, 40)), SamplingParams(max_tokens=50, ignore_eos=True))
    assert isinstance(items[-1], EngineError) and "simulated" in str(items[-1])
    assert worker.engine.kv.num_used_blocks == 0 and not worker.engine.has_unfinished()
    ok = collect(worker, "next", [5, 6], SamplingParams(max_tokens=3, ignore_eos=True))
    assert ok[-1].finish_reason == "length"


def test_refused_request_raises_before_queueing(worker):
    with pytest.raises(RequestError):
        worker.submit("bad", [], SamplingParams(), lambda _: None)
    assert not worker.engine.has_unfinished()


def test_idle_worker_sleeps(worker):
    """The loop thread waits on a condition while idle: it is asleep whenever looked at, and
    its CPU time does not move over a window (its own counters: other threads do not count)."""
    import time

    def cpu_ticks() -> tuple[str, int]:
        fields = open(f"/proc/self/task/{worker._thread.native_id}/stat").read().rsplit(")", 1)[1].split()
        return fields[0], int(fields[11]) + int(fields[12])  # state, utime + stime
    worker.call(lambda engine: None).result(10)  # idle from here on
    state, before = cpu_ticks()
    for _ in range(25):
        time.sleep(0.02)  # an observation window, not a wait for an event
        assert cpu_ticks()[0] == "S"
    assert cpu_ticks()[1] - before <= 1  # a tick is 10 ms: at most one while idle


def test_shutdown_fails_what_is_left(tiny_llama, make_engine):
    w = EngineLoop(make_engine(model=str(tiny_llama))).start()
    got: queue.Queue = queue.Queue()
    done = threading.Event()

    def sink(item):
        got.put(item)
        if isinstance(item, Exception):
            done.set()
    w.submit("long", [5, 6, 7], SamplingParams(max_tokens=400, ignore_eos=True), sink)
    got.get(timeout=30)
    w.shutdown()
    assert done.wait(5)
    assert_no_leak(w.engine)


def test_a_request_failing_in_a_step_fails_alone(worker):
    """A request past validation with a seed manual_seed cannot take, in one batch with two
    others: it gets the error, they finish with their full output, nothing is held."""
    got: dict[str, queue.Queue] = {rid: queue.Queue() for rid in ("a", "bad", "b")}
    good = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with stalled(worker):
        worker.submit("a", [5, 6, 7], good, got["a"].put)
        worker.submit("bad", [5, 6, 8], unchecked(SamplingParams(temperature=1.0, max_tokens=8), seed=2**64), got["bad"].put,
                      validated=True)
        worker.submit("b", [5, 6, 9], good, got["b"].put)
    error = got["bad"].get(timeout=30)
    assert isinstance(error, EngineError) and "sampling set-up failed" in str(error)
    for rid in ("a", "b"):
        items = [got[rid].get(timeout=30) for _ in range(8)]
        assert all(not isinstance(i, Exception) for i in items) and items[-1].finish_reason == "length"
    wait_for(lambda: not worker.engine.has_unfinished(), what="engine drained")
    assert_no_leak(worker.engine)
