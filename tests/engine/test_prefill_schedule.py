"""Whole, chunked and layered prefill give HF's greedy tokens; the batcher's plans for each."""

import pytest

from engine import batcher as batcher_mod
from engine.batcher import Batcher, layer_bounds, num_layer_groups
from engine.kv.manager import KVCacheManager
from engine.request import Request

from helpers import run_to_end
from parity_cases import GREEDY, PROMPT_LENS, prompts

SMALL_GROUPS = ((16, 1), (64, 2), (128, 3))  # tiny prompts still split the 3 tiny layers


def staggered(engine, prompt_list, params, every=3):
    """Adds one request every `every` steps, so prompts keep arriving while others decode."""
    out = {str(i): [] for i in range(len(prompt_list))}
    pending = list(enumerate(prompt_list))
    steps = 0
    while pending or engine.has_unfinished():
        if pending and steps % every == 0:
            i, p = pending.pop(0)
            engine.add_request(str(i), p, params)
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
        steps += 1
        assert steps < 10_000
    return out


@pytest.mark.parametrize("setting", [
    dict(prefill_schedule="whole"),
    dict(prefill_schedule="whole", max_num_batched_tokens=48),       # a prompt over the budget runs alone
    dict(prefill_schedule="chunked", token_budget=24),
    dict(prefill_schedule="layered"),
    dict(prefill_schedule="layered", num_kv_blocks=40, max_model_len=256),  # preemption beside a cohort
    dict(prefill_schedule="layered", max_num_seqs=3),
])
@pytest.mark.parametrize("arrivals", ["together", "staggered"])
def test_schedules_match_hf(setting, arrivals, tiny_llama, references, make_engine, monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    engine = make_engine(model=str(tiny_llama), **setting)
    run = run_to_end if arrivals == "together" else staggered
    out = run(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references("llama")
    assert engine.kv.num_used_blocks == 0 and engine.batcher.cohort is None


def test_layered_abort_mid_cohort_frees_blocks_and_spares_the_rest(tiny_llama, references, make_engine,
                                                                   monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    engine = make_engine(model=str(tiny_llama), prefill_schedule="layered", enable_prefix_caching=False)
    for i, p in enumerate(prompts()):
        engine.add_request(str(i), p, GREEDY)
    engine.step()  # the cohort's first group
    assert engine.batcher.cohort is not None and engine.batcher.cohort.group == 1
    engine.abort("3")
    out = {str(i): [] for i in range(len(PROMPT_LENS))}
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id].extend(o.new_token_ids)
    want = references("llama")
    assert out["3"] == [] and all(out[str(i)] == want[i] for i in range(len(PROMPT_LENS)) if i != 3)
    assert engine.kv.num_used_blocks == 0


def _batcher(schedule, **kw):
    kv = KVCacheManager(1000, 16, enable_prefix_caching=False)
    return Batcher(kv, kw.pop("max_num_seqs", 64), kw.pop("max_num_batched_tokens", 2048), schedule, **kw)


def _request(rid, n):
    return Request(rid, list(range(3, 3 + n)), GREEDY, (), 16384)


def test_layer_groups_follow_the_table():
    assert [num_layer_groups(n, 32) for n in (100, 512, 513, 1024, 2048, 4096, 4097, 8192)] == \
        [1, 1, 2, 2, 4, 8, 16, 16]
    assert num_layer_groups(8192, 3) == 3  # never more groups than layers
    assert [layer_bounds(30, 4, g) for g in range(4)] == [(0, 7), (7, 15), (15, 22), (22, 30)]


def test_layered_plan_runs_one_cohort_a_group_per_step_beside_every_decode():
    b = _batcher("layered", num_layers=30)
    decoding = _request("d", 10)
    b.add(decoding)
    b.schedule()  # a 10-token cohort: one group, decoding from the next step
    decoding.num_computed_tokens = 10
    decoding.append_token(5)
    b.add(_request("a", 1500))
    b.add(_request("b", 500))
    groups = []
    for _ in range(4):
        plan = b.schedule()
        assert [s.request.request_id for s in plan.seqs] == ["d"]  # the decode runs every step
        assert [s.request.request_id for s in plan.cohort.seqs] == ["a", "b"]  # 2000 tokens: 4 groups
        groups.append((plan.cohort.layer_start, plan.cohort.layer_end, plan.cohort.last))
        for s in plan.seqs:
            s.request.num_computed_tokens += 1
            s.request.append_token(5)
    assert groups == [(0, 7, False), (7, 15, False), (15, 22, False), (22, 30, True)]
    assert [r.request_id for r in b.running] == ["d", "a", "b"] and b.cohort is None


def test_whole_and_chunked_plans():
    b = _batcher("chunked", token_budget=512)
    b.add(_request("a", 1500))
    assert [s.num_new_tokens for s in b.schedule().seqs] == [512]
    b = _batcher("whole", max_num_batched_tokens=1024)
    for rid, n in (("a", 1500), ("b", 100), ("c", 2000)):
        b.add(_request(rid, n))
    steps = []
    for _ in range(3):
        plan = b.schedule()
        steps.append([(s.request.request_id, s.num_new_tokens) for s in plan.seqs])
        for s in plan.seqs:
            s.request.num_computed_tokens += s.num_new_tokens
            s.request.append_token(5)
    # a prompt over the budget runs alone (beside decodes); the next waits for a step of its own
    assert steps == [[("a", 1500)], [("a", 1), ("b", 100)], [("a", 1), ("b", 1), ("c", 2000)]]
    with pytest.raises(ValueError, match="prefill schedule"):
        _batcher("sliced")


@pytest.mark.parametrize("schedule", ["whole", "chunked", "layered"])
@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_moe_schedules_match_hf(arch, schedule, tiny_dirs, references, make_engine, monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    engine = make_engine(model=str(tiny_dirs[arch]), prefill_schedule=schedule, token_budget=24)
    out = staggered(engine, prompts(), GREEDY)
    assert [out[str(i)] for i in range(len(PROMPT_LENS))] == references(arch)
    assert engine.kv.num_used_blocks == 0


def test_layered_reads_each_expert_once_per_cohort_where_chunks_reread_them(tiny_dirs, make_engine, monkeypatch):
    monkeypatch.setattr(batcher_mod, "_GROUPS", SMALL_GROUPS)
    from engine.sampling_params import SamplingParams
    prompt = prompts()[-1]  # 200 tokens: 3 groups layered, 9 chunks of 24
    reads = {}
    for schedule in ("chunked", "layered"):
        engine = make_engine(model=str(tiny_dirs["mixtral"]), prefill_schedule=schedule, token_budget=24)
        run_to_end(engine, [prompt], SamplingParams(temperature=0, max_tokens=1))
        stats = engine.stats()
        reads[schedule] = (stats.weight_bytes_dense, stats.weight_bytes_expert)
    layers = 3
    expert = engine.runner.model.layers[0].moe.expert_bytes
    assert reads["layered"][1] % expert == 0 and reads["layered"][1] <= layers * 8 * expert  # each expert once
    assert reads["chunked"][1] > 4 * reads["layered"][1], reads  # each of 9 chunks reads most experts again
    assert reads["chunked"][0] == 9 * reads["layered"][0]  # and every dense weight 9 times
