"""bench's workloads, flag parsing and goodput search (no servers)."""

import json
import random
import statistics

import pytest

from bench.config import build_parser, from_args
from bench.corpus import TextSource, TokenCounter
from bench.datasets import WORKLOADS, DatasetSpec, build_requests
from bench.goodput_search import GoodputSearch


@pytest.fixture(scope="module")
def counter(tiny_llama):
    return TokenCounter.load(str(tiny_llama))


def test_random_prompts_are_real_text_of_the_exact_token_length(counter):
    spec = DatasetSpec("random", 20, input_len=40, output_len=8, range_ratio=0.5, seed=1)
    reqs = build_requests(spec, counter, None)
    assert len(reqs) == 20
    for r in reqs:
        assert 20 <= r.prompt_tokens <= 60 and 4 <= r.max_tokens <= 12
        assert counter.count(r.prompt) == r.prompt_tokens
    text = "".join(r.prompt for r in reqs)
    assert sum(c.isalpha() for c in text) > len(text) * 0.6  # words, not token soup
    assert len({r.prompt_tokens for r in reqs}) > 5  # the range ratio spreads lengths
    again = build_requests(spec, counter, None)
    assert [r.prompt for r in again] == [r.prompt for r in reqs]  # seeded


@pytest.mark.parametrize("kind", ["prose", "code"])
def test_text_windows_hit_the_asked_length(counter, kind):
    source, rng = TextSource(kind, counter), random.Random(0)
    counts = [source.window(n, rng)[1] - n for n in (1, 7, 50, 333, 1000) for _ in range(4)]
    assert sum(c == 0 for c in counts) >= 18 and max(map(abs, counts)) <= 2


def test_without_a_tokenizer_lengths_are_estimated():
    reqs = build_requests(DatasetSpec("random", 5, input_len=100, output_len=4), TokenCounter(None), None)
    assert all(r.prompt_tokens == 100 and 300 <= len(r.prompt) <= 400 for r in reqs)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_synthetic_workloads_follow_their_documented_means(name):
    w, rng = WORKLOADS[name], random.Random(0)
    inputs = [w.input.sample(rng) for _ in range(20000)]
    outputs = [w.output.sample(rng) for _ in range(20000)]
    # clipping to [low, high] moves the mean a little; the shape's own mean is the published one
    assert statistics.mean(inputs) == pytest.approx(w.input.mean, rel=0.06)
    assert statistics.mean(outputs) == pytest.approx(w.output.mean, rel=0.06)
    assert statistics.stdev(inputs) / statistics.mean(inputs) == pytest.approx(w.input.cv, rel=0.25)
    moved = [w.output.sample(rng, mean=30) for _ in range(20000)]  # --output-len moves the mean
    assert statistics.mean(moved) == pytest.approx(30, rel=0.1)


def test_synthetic_requests_fit_the_servers_context(counter):
    reqs = build_requests(DatasetSpec("summarization", 6, seed=2), counter, max_model_len=256)
    assert all(r.prompt.startswith("Summarize the following text.") for r in reqs)
    assert all(r.prompt_tokens + r.max_tokens <= 256 for r in reqs)
    code = build_requests(DatasetSpec("code", 4, seed=3), counter, None)
    assert all(("def " in r.prompt or "=" in r.prompt or "(" in r.prompt) for r in code)


def test_files_jsonl_and_sharegpt(tmp_path, counter):
    jsonl = tmp_path / "w.jsonl"
    jsonl.write_text('{"prompt": "hello there", "max_tokens": 7}\n\n{"prompt": "bye", "output_len": 3}\n')
    reqs = build_requests(DatasetSpec("file", 5, path=str(jsonl)), counter, None)
    assert len(reqs) == 5 and {(r.prompt, r.max_tokens) for r in reqs} == {("hello there", 7), ("bye", 3)}
    share = tmp_path / "sg.json"
    share.write_text(json.dumps([
        {"conversations": [{"from": "human", "value": "Tell me a story."},
                           {"from": "gpt", "value": "Once upon a time"}]},
        {"conversations": [{"from": "human", "value": "only one turn"}]},
    ]))
    reqs = build_requests(DatasetSpec("file", 2, path=str(share)), counter, None)
    assert [r.prompt for r in reqs] == ["Tell me a story."] * 2
    assert reqs[0].max_tokens == counter.count("Once upon a time")
    (tmp_path / "bad.jsonl").write_text('{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="needs a 'prompt'"):
        build_requests(DatasetSpec("file", 1, path=str(tmp_path / "bad.jsonl")), counter, None)


def test_a_jsonl_trace_replays_in_order_at_its_times(tmp_path, counter):
    from bench.session import _send_times
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"prompt": "a", "max_tokens": 4, "at_s": 0}\n{"prompt": "b c", "max_tokens": 2, "at_s": 0}\n'
                     '{"prompt": "long one", "max_tokens": 1, "at_s": 6.5}\n')
    reqs = build_requests(DatasetSpec("file", 100, path=str(trace)), counter, None)
    assert [(r.prompt, r.max_tokens, r.at_s) for r in reqs] == [("a", 4, 0.0), ("b c", 2, 0.0), ("long one", 1, 6.5)]
    assert _send_times(reqs, 0.1, 1.0, 0) == [0.0, 0.0, 6.5]  # the trace's times, not the rate's
    plain = tmp_path / "p.jsonl"
    plain.write_text('{"prompt": "a"}\n')
    reqs = build_requests(DatasetSpec("file", 3, path=str(plain)), counter, None)
    assert [r.at_s for r in reqs] == [None] * 3 and _send_times(reqs, float("inf"), 1.0, 0) == [0.0] * 3
    trace.write_text('{"prompt": "a", "at_s": 0}\n{"prompt": "b"}\n')
    with pytest.raises(ValueError, match="'at_s' on every row"):
        build_requests(DatasetSpec("file", 2, path=str(trace)), counter, None)


def parse(*argv):
    return from_args(build_parser().parse_args(list(argv)))


def test_flags():
    c = parse("--target", "a=http://h:1/", "--target", "b=http://h:2", "--goodput", "ttft:500", "tpot:50",
              "--sweep-rates", "1,2.5", "--dataset", "file", "x.jsonl", "--num-prompts", "3", "--warmup", "2")
    assert c.targets == (("a", "http://h:1"), ("b", "http://h:2"))
    assert (c.slo.ttft_ms, c.slo.tpot_ms, c.slo.e2el_ms) == (500, 50, None)
    assert c.rates == (1.0, 2.5) and c.dataset.path == "x.jsonl" and c.dataset.num_prompts == 3 and c.warmup == 2
    assert parse("--base-url", "http://h:1").rates == (float("inf"),)
    for bad, match in [((), "--base-url"), (("--base-url", "http://h", "--goodput", "ttft=5"), "ttft:MS"),
                       (("--base-url", "http://h", "--dataset", "file"), "file PATH"),
                       (("--base-url", "http://h", "--find-goodput"), "needs SLOs"),
                       (("--target", "nourl"), "NAME=http"),
                       (("--base-url", "http://h", "--sweep-rates", "1,x"), "comma")]:
        with pytest.raises(ValueError, match=match):
            parse(*bad)


def test_goodput_search_brackets_then_bisects():
    capacity = 3.3  # attainment holds up to this rate, then falls
    search = GoodputSearch(0.9, start_rate=1.0, max_phases=12, rel_tol=0.05)
    while (rate := search.next_rate()) is not None:
        search.record(rate, 1.0 if rate <= capacity else 0.5)
    assert [r for r, _ in search.history[:3]] == [1.0, 2.0, 4.0]  # doubling until it fails
    assert search.goodput <= capacity < search.hi and (search.hi - search.goodput) / search.hi <= 0.05
    down = GoodputSearch(0.9, start_rate=8.0, max_phases=4)
    while (rate := down.next_rate()) is not None:
        down.record(rate, 0.0)
    assert [r for r, _ in down.history] == [8.0, 4.0, 2.0, 1.0] and down.goodput is None
    assert "below 1" in down.describe()


def test_shift_prompts_go_from_short_to_long_halfway():
    from bench.corpus import TokenCounter
    from bench.datasets import DatasetSpec, build_requests
    requests = build_requests(DatasetSpec("shift", 40, input_len=400, output_len=8), TokenCounter(None), None)
    first, second = [r.prompt_tokens for r in requests[:20]], [r.prompt_tokens for r in requests[20:]]
    assert max(first) <= 130 and min(second) >= 500 and all(r.max_tokens == 8 for r in requests)
