"""Abort at any point of a request's life frees every block it held."""

import pytest

from engine.request import RequestStatus
from engine.sampling_params import SamplingParams

P = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


@pytest.fixture
def engine(tiny_llama, make_engine):
    return make_engine(model=str(tiny_llama), max_num_batched_tokens=32, max_num_seqs=2)


def test_abort_while_waiting(engine):
    for rid in "abc":
        engine.add_request(rid, list(range(3, 20)), P)
    engine.step()
    waiting = engine.requests["c"][0]
    assert waiting.status is RequestStatus.WAITING
    assert engine.abort("c") and waiting.status is RequestStatus.FINISHED_ABORTED
    engine.abort("a")
    engine.abort("b")


def test_abort_mid_chunked_prefill(engine):
    engine.add_request("long", list(range(3, 200)), P)
    engine.step()
    r = engine.requests["long"][0]
    assert 0 < r.num_computed_tokens < r.num_prompt_tokens and r.block_ids
    engine.abort("long")
    assert r.block_ids == []


def test_abort_while_decoding_and_of_one_sample(engine):
    engine.add_request("d", list(range(3, 20)), SamplingParams(n=2, max_tokens=50, ignore_eos=True, seed=0))
    for _ in range(5):
        engine.step()
    first, second = engine.requests["d"]
    assert first.num_output_tokens > 1
    engine.abort("d", index=0)
    assert first.status.finished and not second.status.finished
    engine.step()
    engine.abort("d")
    assert second.status is RequestStatus.FINISHED_ABORTED
    assert not engine.abort("d")  # unknown ids are a no-op
