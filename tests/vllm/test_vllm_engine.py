"""vLLM's engine behind the worker seam, without Ray: colocated through the engine loop, and
one prefill and one decode engine in processes of their own joined by pdserve's connector
over a gloo link. Greedy outputs equal vLLM's own offline LLM.generate."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest

import vllm_procs

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def colocated(tiny_vllm):
    from engine.vllm_backend.engine import VllmEngine
    from engine.worker.loop import EngineLoop
    engine = VllmEngine(vllm_procs.engine_config(str(tiny_vllm)))
    loop = EngineLoop(engine).start()
    yield loop
    loop.shutdown()
    engine.close()


def _run(loop, prompts, params) -> dict[str, list[int]]:
    """Submits every prompt at once (one batch), waits for all; token ids per request id."""
    tokens = {str(i): [] for i in range(len(prompts))}
    done = threading.Semaphore(0)
    errors = []

    def sink(rid):
        def put(out):
            if isinstance(out, Exception):
                errors.append(out)
                done.release()
                return
            tokens[rid] += out.new_token_ids
            if out.finished:
                done.release()
        return put

    for i, prompt in enumerate(prompts):
        loop.submit(str(i), prompt, params, sink(str(i)))
    for _ in prompts:
        assert done.acquire(timeout=120)
    assert not errors, errors
    return tokens


def test_colocated_greedy_equals_vllm_offline(colocated, vllm_prompts, vllm_reference):
    from engine.sampling_params import SamplingParams
    tokens = _run(colocated, vllm_prompts, SamplingParams(temperature=0, max_tokens=16))
    assert [tokens[str(i)] for i in range(len(vllm_prompts))] == vllm_reference
    assert colocated.call(lambda e: (e.stats().num_kv_blocks_used, e.num_requests())).result(30) == (0, 0)


def test_colocated_refusals_and_samples(colocated):
    from engine.errors import RequestError
    from engine.sampling_params import SamplingParams
    with pytest.raises(RequestError, match="greedy"):  # vLLM's own check, as a 400
        colocated.engine.validate([5, 6], SamplingParams(temperature=0, n=2))
    with pytest.raises(RequestError, match="kv_prediction"):
        colocated.engine.validate([5, 6], SamplingParams(kv_prediction=True))
    tokens = _run(colocated, [[7, 8, 9]] * 2, SamplingParams(temperature=1.0, seed=11, max_tokens=8))
    assert tokens["0"] == tokens["1"] and len(tokens["0"]) == 8  # seeded: reproducible
    assert colocated.call(lambda e: e.stats().num_kv_blocks_used).result(30) == 0


def test_colocated_constraints_and_token_filters(colocated, tiny_vllm):
    """Structured outputs go to vLLM's own support; logit_bias, allowed_token_ids and bad words
    reach vLLM's sampler; a bad constraint is a RequestError before the request is queued."""
    from engine.errors import RequestError
    from engine.sampling_params import SamplingParams
    from engine.structured_output import StructuredOutput
    from scheduler.tokenizer import Tokenizer
    tok = Tokenizer.load(tiny_vllm)
    greedy = dict(temperature=0, max_tokens=6, ignore_eos=True)
    choices = ["ab cd", "ef"]
    out = _run(colocated, [[7, 8, 9]], SamplingParams(temperature=0, max_tokens=16,
                                                       structured=StructuredOutput.choice(choices)))["0"]
    assert tok.decode(out) in choices
    assert _run(colocated, [[7, 8, 9]], SamplingParams(**greedy, logit_bias={42: 100}))["0"] == [42] * 6
    assert set(_run(colocated, [[7, 8, 9]], SamplingParams(**greedy, allowed_token_ids=(40, 41)))["0"]) <= {40, 41}
    free = _run(colocated, [[7, 8, 9]], SamplingParams(**greedy))["0"]
    banned = _run(colocated, [[7, 8, 9]], SamplingParams(**greedy, bad_words_ids=((free[0],),)))["0"]
    assert free[0] not in banned
    with pytest.raises(RequestError, match="regex"):
        colocated.engine.validate([5, 6], SamplingParams(structured=StructuredOutput("regex", "[a-")))
    got = []
    done = threading.Event()
    colocated.submit("p", [7, 8, 9, 10], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=1),
                     lambda o: (got.append(o), o.finished and done.set()))
    assert done.wait(60)
    prompt = next(o.prompt_logprobs for o in got if o.prompt_logprobs)
    assert prompt[0] is None and [lp.token_id for lp in prompt[1:]] == [8, 9, 10]
    assert all(lp.logprob <= 0 and len(lp.top) == 1 for lp in prompt[1:])
    assert colocated.call(lambda e: (e.stats().num_kv_blocks_used, e.num_requests())).result(30) == (0, 0)


def test_disaggregated_layer_by_layer(tiny_vllm, vllm_prompts, vllm_reference):
    """Every request's first layer-0 chunk lands while the producer's forward is still at its
    last layer (the producer's sink holds that layer's save until the consumer says so), and
    the decode engine's greedy output equals vLLM offline, with the producer holding every
    prompt's prefix in its cache and the consumer none."""
    ctx = mp.get_context("spawn")
    ports, skips, results = ctx.Queue(), ctx.Queue(), ctx.Queue()
    landed = [ctx.Event() for _ in vllm_prompts]
    consumer = ctx.Process(target=vllm_procs.consume,
                           args=(str(tiny_vllm), ports, skips, vllm_prompts, 16, landed, results))
    consumer.start()
    port = ports.get(timeout=120)
    producer = ctx.Process(target=vllm_procs.produce, args=(str(tiny_vllm), port, vllm_prompts, skips, landed, results))
    producer.start()
    try:
        got = dict(r[0:1] + (r[1:],) for r in (results.get(timeout=240), results.get(timeout=240)))
    finally:
        for proc in (producer, consumer):
            proc.join(60)
            if proc.exitcode is None:
                proc.kill()
    waited, sent, producer_blocks, producer_hits = got["produced"]
    assert producer_hits > 0  # it computed only the prompts' tails; their cached prefixes were sent too
    tokens, arrivals, consumer_blocks, consumer_requests = got["consumed"]
    assert waited == {str(i): True for i in range(len(vllm_prompts))}, "a layer 0 did not land during the forward"
    assert tokens == vllm_reference
    assert (producer_blocks, consumer_blocks, consumer_requests) == (0, 0, 0)
    num_layers = 4
    steps = {rid for rid, layer, _ in sent if layer == 0}
    assert len(steps) == len(vllm_prompts)
    assert max(layer for _, layer, _ in arrivals) == num_layers - 1


def test_an_engine_with_fewer_threads_than_cores_steps_on_another_thread(tiny_vllm):
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=vllm_procs.fewer_threads_than_cores, args=(str(tiny_vllm), results))
    proc.start()
    try:
        tokens, errors, cores = results.get(timeout=300)
    finally:
        proc.join(60)
        if proc.exitcode is None:
            proc.kill()
    assert not errors and len(tokens) == 4, (errors, cores)
