"""The HTTP server on loopback with the tiny model: openai client, bad input, disconnects."""

import json
import re

import httpx
import openai
import pytest

from bad_requests import BAD
from helpers import LiveServer, assert_no_leak, gated, metric_sum, stalled, wait_for


@pytest.fixture(scope="module")
def client(tiny_server):
    return openai.OpenAI(base_url=tiny_server.url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_models_health_and_metrics(tiny_server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(tiny_server.url + "/health").status_code == 200
    text = httpx.get(tiny_server.url + "/metrics").text
    for name in ("pdserve_request_ttft_seconds", "pdserve_request_itl_seconds", "pdserve_request_tpot_seconds",
                 "pdserve_request_e2e_seconds", "pdserve_request_queue_seconds", "pdserve_worker_running_requests",
                 "pdserve_worker_waiting_requests", "pdserve_worker_kv_blocks_used", "pdserve_worker_kv_blocks_total",
                 "pdserve_prompt_tokens_total", "pdserve_generation_tokens_total", "pdserve_requests_finished_total"):
        assert name in text, name
    assert 'pdserve_worker_up{pool="colocated",worker="colocated-0"} 1.0' in text


def test_completion(client):
    out = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=8, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.completion_tokens <= 8
    batch = client.completions.create(model="tiny", prompt=["Paris is", "def f"], max_tokens=4, n=2,
                                      temperature=0.8, seed=1)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert ids.usage.prompt_tokens == 3


def test_greedy_matches_offline_engine(tiny_llama, client):
    from engine import LLM, SamplingParams
    out = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    llm = LLM(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256)
    offline = llm.generate("The quick brown fox", SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0]
    assert out.choices[0].text == offline.text and out.usage.completion_tokens == len(offline.token_ids)
    assert_no_leak(llm.engine)


def test_chat_and_streaming(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    out = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0)
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=6, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == out.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == out.choices[0].finish_reason
    comp = list(client.completions.create(model="tiny", prompt="Paris", max_tokens=5, temperature=0, stream=True))
    assert comp[-1].choices[0].finish_reason is not None


def test_per_phase_timings_only_when_asked(tiny_server):
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    url = tiny_server.url + "/v1/completions"
    assert "timings" not in httpx.post(url, json=body).json()["choices"][0]
    timed = httpx.post(url, json=body, headers={"x-pdserve-timings": "1"}).json()["choices"][0]["timings"]
    assert set(timed) == {"queue", "prefill", "decode"} and all(v >= 0 for v in timed.values())
    with httpx.stream("POST", url, json={**body, "stream": True}, headers={"x-pdserve-timings": "1"}) as r:
        chunks = [line for line in r.iter_lines() if line.startswith("data: {")]
    assert "timings" in chunks[-1] and all("timings" not in c for c in chunks[:-1])  # on the last chunk only


def test_logprobs_in_responses(client):
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                         temperature=0, logprobs=True, top_logprobs=2)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and len(content[0].top_logprobs) == 2
    comp = client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0, logprobs=2)
    assert len(comp.choices[0].logprobs.token_logprobs) == 3


@pytest.mark.parametrize("path,body", BAD, ids=[f"{i}" for i in range(len(BAD))])
def test_bad_input_gets_a_4xx_and_the_server_keeps_serving(tiny_server, path, body):
    kwargs = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(tiny_server.url + path, timeout=30, **kwargs)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and err["type"]
    ok = httpx.post(tiny_server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30)
    assert ok.status_code == 200


def test_a_refused_request_is_json_counted_and_keeps_its_connection(tiny_server):
    before = metric_sum(tiny_server.url, "pdserve_requests_rejected_total")
    with httpx.Client(base_url=tiny_server.url, timeout=30) as client:  # one keep-alive connection
        bad = client.post("/v1/completions", content=json.dumps({"prompt": "abc \ud800 def", "max_tokens": 4}),
                          headers={"content-type": "application/json"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200
    assert metric_sum(tiny_server.url, "pdserve_requests_rejected_total") == before + 1


def test_one_bad_request_does_not_fail_the_others_in_its_batch(tiny_server):
    """The exact requests that once made a step raise, sent while others stream: the others
    finish, the bad ones are refused."""
    import concurrent.futures
    good = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True, "temperature": 0}
    bad = [{"prompt": "Hi", "max_tokens": 4, "temperature": 1, "seed": 18446744073709551616},
           {"prompt": "Hi", "max_tokens": 4, "min_tokens": 2, "stop_token_ids": [1000000]}]
    post = lambda body: httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=60)  # noqa: E731
    with concurrent.futures.ThreadPoolExecutor(5) as pool:
        with stalled(tiny_server.loop):  # the good ones and the bad ones would share a step
            goods = [pool.submit(post, good) for _ in range(3)]
            bads = [pool.submit(post, b) for b in bad]
            assert all(b.result().status_code == 400 for b in bads)
    assert all(g.result().status_code == 200 and g.result().json()["usage"]["completion_tokens"] == 12 for g in goods)


def test_client_disconnect_mid_stream_frees_blocks(tiny_server):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with gated(tiny_server.loop) as release:  # the request advances only as the test allows
        with httpx.stream("POST", tiny_server.url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            release(8)
            got = [next(lines) for _ in range(6)]
            assert any(line.startswith("data: ") for line in got)
            assert metric_sum(tiny_server.url, "pdserve_worker_kv_blocks_used") > 0
    wait_for(lambda: metric_sum(tiny_server.url, "pdserve_worker_kv_blocks_used") == 0,
             "the blocks of a disconnected stream to be freed", timeout_s=5)
    assert_no_leak(tiny_server.engine)


def test_client_disconnect_of_a_non_streaming_request_aborts_it(tiny_server):
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True}
    with stalled(tiny_server.loop):  # the request cannot finish before its client gives up
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(tiny_server.url + "/v1/completions", json=body, timeout=0.3)
    wait_for(lambda: not tiny_server.engine.has_unfinished()
             and metric_sum(tiny_server.url, "pdserve_worker_kv_blocks_used") == 0,
             "a non-streaming request outlived its client", timeout_s=5)


def test_api_key(tiny_llama):
    from engine.config import EngineConfig
    server = LiveServer(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=128), api_key="s3cret")
    try:
        r = httpx.post(server.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        wrong = httpx.get(server.url + "/v1/models", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
        good = openai.OpenAI(base_url=server.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.completions.create(model=good.models.list().data[0].id, prompt="hi", max_tokens=2).choices
    finally:
        server.stop()
    assert_no_leak(server.engine)


def test_stream_error_event_format():
    from scheduler.api.formats import CompletionShape
    from scheduler.api.responses import sse as _sse

    async def failing():
        raise RuntimeError("boom")
        yield  # pragma: no cover

    import asyncio

    from scheduler.metrics import ServerMetrics
    metrics = ServerMetrics()

    async def collect():
        shape = CompletionShape("id", "m", None, 1, 1)
        return [c async for c in _sse(failing(), shape, False, metrics)]
    chunks = asyncio.run(collect())
    assert json.loads(chunks[0][6:])["error"]["message"] == "boom" and chunks[-1] == "data: [DONE]\n\n"
    # counted as a 500 and, failed by the server, as an SLO miss
    assert metrics.registry.get_sample_value("pdserve_requests_rejected_total", {"status": "500"}) == 1
    assert metrics.registry.get_sample_value("pdserve_slo_requests_total", {"result": "missed"}) == 1


def test_colocated_sheds_beyond_its_queue_bound(tiny_llama):
    """--max-queued-requests 2: with the engine held, two streams wait for their first token
    and a third gets a real 503 with Retry-After; released, the two finish."""
    from concurrent.futures import ThreadPoolExecutor

    from engine.config import EngineConfig
    from scheduler.api.limits import FrontDoorLimits
    from scheduler.config import ServeConfig
    server = LiveServer(EngineConfig(model=str(tiny_llama), num_kv_blocks=64, max_model_len=256),
                        serve_config=ServeConfig(mode="colocated", limits=FrontDoorLimits(max_queued_requests=2)))
    state = server.app.state.pd
    body = {"prompt": [5, 6, 7], "max_tokens": 3, "stream": True}
    try:
        with ThreadPoolExecutor(2) as pool:
            with stalled(server.loop):
                waiting = [pool.submit(httpx.post, server.url + "/v1/completions", json=body, timeout=60)
                           for _ in range(2)]
                wait_for(lambda: state.num_queued == 2, "two requests to wait for their first token")
                shed = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
                assert shed.status_code == 503 and shed.headers["retry-after"]
                assert "--max-queued-requests" in shed.json()["error"]["message"]
            for f in waiting:
                r = f.result(60)
                assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        many = httpx.post(server.url + "/v1/completions", json={**body, "prompt": [[5, 6, i] for i in range(8)]},
                          timeout=60)  # one request of 8 prompts holds one place
        assert many.status_code == 200 and state.num_queued == 0
    finally:
        server.stop()
    assert_no_leak(server.engine)


def test_a_vllm_dashboard_finds_every_series(tiny_server, client):
    """Every metric vLLM's example Grafana dashboard queries (tests/fixtures) has a series for the
    served model once a request has run; cumulative ones are counters."""
    from pathlib import Path

    import promql_parser
    from prometheus_client.parser import text_string_to_metric_families
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                   temperature=0, n=2, seed=1)
    lines = (Path(__file__).parents[1] / "fixtures" / "vllm_grafana_queries.txt").read_text().splitlines()
    queries = [q for q in lines if q and not q.startswith("#")]
    samples = {(s.name, s.labels.get("model_name")) for f in text_string_to_metric_families(
        httpx.get(tiny_server.url + "/metrics").text) for s in f.samples}
    types = {f.name: f.type for f in text_string_to_metric_families(httpx.get(tiny_server.url + "/metrics").text)}
    names = set()
    for query in queries:
        promql_parser.parse(query.replace("$__rate_interval", "1m"))
        names |= set(re.findall(r"vllm:[a-z0-9_]+", query))
    assert len(names) >= 20
    for name in names:
        assert (name, "tiny") in samples, name
    for name in ("vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success", "vllm:prefix_cache_hits",
                 "vllm:prefix_cache_queries"):
        assert types[name] == "counter", name
