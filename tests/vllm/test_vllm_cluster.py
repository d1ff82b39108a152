"""pdserve serve --engine vllm --mode disagg on a local Ray cluster (loopback, a tiny model):
one prefill and two decode vLLM workers behind pdserve's front door and global scheduler.
Greedy outputs equal vLLM's own offline LLM.generate; streams cut anywhere leave no block on
either engine; bad input is refused at the front door; a killed decode worker fails only its
own streams, a killed prefill worker's requests fail clearly, and both rejoin."""

from __future__ import annotations

import math
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import psutil
import pytest

import vllm_procs
from bad_requests import BAD
from cluster_helpers import (
    TIMEOUT_S,
    all_in_parallel,
    assert_clean,
    certain_outcomes,
    complete,
    hang_then_kill,
    rejoined,
    stop_and_check_processes,
    stream_all,
    stream_and_cut,
    workers,
)
from helpers import LiveServer, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def p1d2(tiny_vllm):
    from scheduler.cluster import LOOPBACK_ENV
    from scheduler.config import ServeConfig
    os.environ.update(LOOPBACK_ENV)
    import ray
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False)
    # round-robin: the kill test needs streams on both decode workers whatever the load says
    server = LiveServer(vllm_procs.engine_config(str(tiny_vllm), max_model_len=600),
                        serve_config=ServeConfig(mode="disagg", prefill_workers=1, decode_workers=2,
                                                 policy="round-robin"))
    yield server
    try:
        stop_and_check_processes(server)
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def expected(tiny_vllm, vllm_prompts, vllm_reference) -> list[str]:
    """vLLM's offline token ids as the server's text."""
    from scheduler.tokenizer import TextStream, Tokenizer
    tokenizer = Tokenizer.load(tiny_vllm)
    out = []
    for prompt, ids in zip(vllm_prompts, vllm_reference):
        stream = TextStream(tokenizer, prompt, (), True)
        stream.add(ids)
        out.append(stream.delta(final=True))
    return out


def _text(server, prompt, n: int = 16) -> str:
    r = complete(server, prompt, n, min_tokens=0)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_1p1d_greedy_equals_vllm_offline_and_reports_phases(p1d2, vllm_prompts, expected):
    assert all(i.address.startswith("127.0.0.1:") for i in p1d2.cluster.describe())
    assert all_in_parallel(lambda p: _text(p1d2, p), vllm_prompts) == expected  # 8 at once, chunked prefill
    timings = complete(p1d2, vllm_prompts[-1], 4).json()["choices"][0]["timings"]
    assert {"queue", "prefill", "transfer", "decode", "kv_span"} <= timings.keys() and timings["kv_bytes"] > 0
    families = httpx.get(f"{p1d2.url}/metrics", timeout=TIMEOUT_S).text
    assert 'pdserve_worker_kv_blocks_total{pool="decode",worker="decode-0"}' in families
    assert_clean(p1d2)


@pytest.mark.parametrize("path,body", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_is_refused_at_the_front_door(p1d2, path, body):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(p1d2.url + path, timeout=30, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert r.json()["error"]["message"]


def test_100_cut_streams_leave_no_block_on_either_engine(p1d2, vllm_prompts, expected):
    rng = random.Random(1)
    jobs = [([rng.randrange(3, 500) for _ in range(rng.choice((1, 7, 40, 130, 300)))], rng.randrange(1, 40),
             rng.choice((0, 1, 2, 5, 1000)), rng.choice((0.0, 0.005, 0.05, math.inf))) for _ in range(100)]
    outcomes = all_in_parallel(lambda job: stream_and_cut(p1d2, *job), jobs, workers=16)
    cut, done = certain_outcomes(jobs)
    assert cut > 20 and done > 3 and outcomes.count("cut") >= cut and outcomes.count("done") >= done
    assert_clean(p1d2, timeout_s=20)  # read from vLLM's block pool and its scheduler on every worker
    assert _text(p1d2, vllm_prompts[-1]) == expected[-1]
    assert_clean(p1d2)


def test_idle_workers_sleep(p1d2):
    """No request: a vLLM worker's process uses well under a tenth of a core (it sleeps, never steps)."""
    procs = [psutil.Process(info.pid) for info in p1d2.cluster.describe()]
    before = [sum(p.cpu_times()[:2]) for p in procs]
    started = time.monotonic()
    time.sleep(3)
    elapsed = time.monotonic() - started
    used = [sum(p.cpu_times()[:2]) - b for p, b in zip(procs, before)]
    assert all(u < 0.1 * elapsed for u in used), used


def test_killed_decode_worker_fails_only_its_streams_and_rejoins(p1d2, vllm_prompts, expected):
    before = workers(p1d2)["decode-0"]
    started = [threading.Event() for _ in range(6)]
    ends: dict = {}
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(stream_all, p1d2, vllm_prompts[i % 3], 300, started[i], ends, i) for i in range(6)]
        for e in started:
            assert e.wait(60), "streams did not start"
        killed_at = time.monotonic()
        os.kill(before["pid"], signal.SIGKILL)
        results = [f.result(TIMEOUT_S) for f in futures]
    failed = [i for i, lines in enumerate(results) if any('"error"' in x for x in lines)]
    ok = [i for i in range(6) if i not in failed]
    assert failed and ok, "the streams should have been spread over both decode workers"
    for i in failed:
        assert ends[i] - killed_at < 10 and results[i][-1] == "data: [DONE]"
    for i in ok:
        assert '"finish_reason": "length"' in results[i][-2] and results[i][-1] == "data: [DONE]"
    wait_for(lambda: rejoined(p1d2, "decode-0", before["incarnation"]), "decode-0 to rejoin", 120)
    # the prefill worker has every prompt cached, the restarted decode worker none: prefixes are sent too
    assert all_in_parallel(lambda p: _text(p1d2, p), vllm_prompts * 2) == expected * 2
    assert_clean(p1d2)


def test_killed_only_prefill_worker_fails_its_requests_clearly(p1d2, vllm_prompts, expected):
    before = workers(p1d2)["prefill-0"]
    responses = hang_then_kill(p1d2, "prefill-0", lambda s, p: complete(s, p, 4), vllm_prompts[:4])
    for r in responses:
        assert r.status_code >= 500 and "prefill" in r.json()["error"]["message"], r.text
    wait_for(lambda: rejoined(p1d2, "prefill-0", before["incarnation"]), "prefill-0 to rejoin", 120)
    assert _text(p1d2, vllm_prompts[3]) == expected[3]
    assert_clean(p1d2)
