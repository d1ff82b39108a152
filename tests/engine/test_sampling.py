"""Sampling controls through the offline LLM API on the tiny model."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.errors import RequestError
from engine.request import Request
from engine.sampler import _apply_penalties

from helpers import assert_no_leak, unchecked

PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def llm(tiny_llama):
    llm = LLM(model=str(tiny_llama), num_kv_blocks=128, max_model_len=256)
    yield llm
    assert_no_leak(llm.engine)


def greedy(llm, **kw):
    return llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, **kw))[0]


def test_output_shape(llm):
    out = greedy(llm)
    assert out.prompt_token_ids == llm.tokenizer.encode(PROMPT)
    assert len(out.token_ids) == 20 and out.finish_reason == "length"
    assert out.text == llm.tokenizer.decode(out.token_ids).rstrip("\ufffd")  # an unfinished UTF-8 tail is held back
    token_prompt = llm.generate([out.prompt_token_ids], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0]
    assert token_prompt.token_ids == out.token_ids


def test_seed_reproduces_whatever_shares_the_batch(llm):
    p = SamplingParams(temperature=1.0, seed=42, max_tokens=16, ignore_eos=True)
    alone = llm.generate(PROMPT, p)[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=24, ignore_eos=True)
    mixed = llm.generate(["Paris is", PROMPT, "def f"], [others, p, others])[1].token_ids
    assert alone == mixed
    other_seed = llm.generate(PROMPT, SamplingParams(temperature=1.0, seed=43, max_tokens=16, ignore_eos=True))[0]
    assert other_seed.token_ids != alone


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_leave_only_the_top_token_equal_greedy(llm, kw):
    sampled = llm.generate(PROMPT, SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True, seed=1, **kw))[0]
    assert sampled.token_ids == greedy(llm).token_ids


def test_stop_string_is_not_emitted(llm):
    full = greedy(llm)
    stop = full.text[10:14]
    assert stop.strip(), full.text
    out = greedy(llm, stop=[stop])
    assert out.finish_reason == "stop"
    assert out.text == full.text[:full.text.index(stop)]
    assert stop not in out.text


def test_stop_token_ids_and_min_tokens(llm):
    full = greedy(llm).token_ids
    out = greedy(llm, stop_token_ids=[full[4]])
    assert out.finish_reason == "stop" and out.token_ids == full[:full.index(full[4]) + 1]
    held = greedy(llm, stop_token_ids=[full[0]], min_tokens=5)
    assert full[0] not in held.token_ids[:5] and len(held.token_ids) >= 5


def test_max_tokens_and_length(llm):
    out = llm.generate(PROMPT, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.token_ids) == 3 and out.finish_reason == "length"


def test_logprobs_of_sampled_tokens_with_alternatives(llm):
    out = greedy(llm, logprobs=3)
    lps = out.outputs[0].logprobs
    assert len(lps) == len(out.token_ids)
    for token, lp in zip(out.token_ids, lps):
        assert lp.token_id == token and lp.logprob <= 0
        assert len(lp.top) == 3 and lp.top[0][0] == token  # greedy picks the top-1
        assert lp.top[0][1] == pytest.approx(lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)


def test_n_samples_are_distinct_and_reproducible(llm):
    p = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    a = llm.generate(PROMPT, p)[0]
    b = llm.generate(PROMPT, p)[0]
    assert len(a.outputs) == 3
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
    assert len({tuple(c.token_ids) for c in a.outputs}) > 1


def test_penalties_arithmetic():
    r = Request("r", [1, 2], SamplingParams(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25),
                (0,), 100)
    r.all_token_ids += [3, 3]
    row = torch.tensor([1.0, 4.0, -4.0, 2.0, 1.0])
    _apply_penalties(row, r)
    # tokens 1,2,3 seen: positive logits halved, negative doubled; token 3 twice in the output
    assert row.tolist() == [1.0, 2.0, -8.0, 1.0 - 0.5 - 2 * 0.25, 1.0]


def test_repetition_penalty_changes_greedy_output(llm):
    assert greedy(llm, repetition_penalty=5.0).token_ids != greedy(llm).token_ids


@pytest.mark.parametrize("kw", [dict(n=9), dict(n=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                dict(max_tokens=0), dict(min_p=2), dict(logprobs=50), dict(top_k=-5)])
def test_bad_sampling_params_raise(kw):
    with pytest.raises(RequestError):
        SamplingParams(**kw)


@pytest.mark.parametrize("bad, why, status", [
    (dict(temperature=1.0, seed=2**64), "sampling set-up failed", 500),                 # overflows manual_seed
    (dict(min_tokens=2, stop_token_ids=[1_000_000]), "sampling set-up failed", 500),  # beyond the vocabulary
    (dict(allowed_token_ids=[5], bad_words_ids=[[5]]), "no token is left", 400),       # filters that leave nothing
    (dict(temperature=1.0, seed=1, allowed_token_ids=[5], bad_words_ids=[[5]]), "no token is left", 400),
])
def test_a_request_failing_its_sampling_set_up_fails_alone(llm, bad, why, status):
    """Values the front door refuses, forced past validation, and filters that leave no token:
    the step goes on for the others, whose output is what it is without the bad request in the
    batch; a request whose own parameters leave nothing to sample fails as its own fault."""
    engine = llm.engine
    good = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
            SamplingParams(temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)]
    prompts = [llm.tokenizer.encode(p) for p in ("Paris is", "def f")]
    alone = [o.token_ids for o in llm.generate(prompts, good)]
    engine.add_request("bad", llm.tokenizer.encode(PROMPT), unchecked(SamplingParams(max_tokens=12), **bad), validated=True)
    for i, (ids, p) in enumerate(zip(prompts, good)):
        engine.add_request(f"good{i}", ids, p)
    tokens: dict[str, list[int]] = {"good0": [], "good1": []}
    errors = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.error is not None:
                errors.append((out.request_id, out.error, out.error_status))
            else:
                tokens[out.request_id] += out.new_token_ids
    assert [(rid, status) for rid, _, status in errors] == [("bad", status)] and why in errors[0][1], errors
    assert [tokens["good0"], tokens["good1"]] == alone
    assert_no_leak(engine)
