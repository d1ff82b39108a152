"""Batch planning with plain numbers: budget, max_num_seqs, chunking, preemption, leak-free."""

from engine.batcher import Batcher
from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus
from engine.sampling_params import SamplingParams


def make(num_blocks=32, block_size=4, max_num_seqs=8, budget=64):
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
    return Batcher(kv, max_num_seqs, budget), kv


def req(rid, n_prompt, max_tokens=8):
    return Request(rid, list(range(1, n_prompt + 1)), SamplingParams(max_tokens=max_tokens), (0,), 4096)


def fake_step(batcher, plan, token=5):
    """What the engine does after a forward: advance counts, append a token where sampled."""
    sampled = [s.request for s in plan.seqs if s.samples]
    for s in plan.seqs:
        s.request.num_computed_tokens += s.num_new_tokens
    for r in sampled:
        status = r.append_token(token)
        if status:
            batcher.finish(r, status)


def test_prompts_and_decodes_share_one_budget():
    b, kv = make(budget=20)
    b.add(req("a", 10))
    plan = b.schedule()
    assert [s.num_new_tokens for s in plan.seqs] == [10]
    fake_step(b, plan)
    b.add(req("b", 30))
    plan = b.schedule()
    # one decode token for a, the rest of the budget for b's first chunk
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.seqs] == [("a", 1), ("b", 19)]
    assert plan.seqs[0].samples and not plan.seqs[1].samples
    fake_step(b, plan)
    plan = b.schedule()
    assert [(s.request.request_id, s.num_new_tokens) for s in plan.seqs] == [("a", 1), ("b", 11)]
    assert plan.seqs[1].samples
    for r in list(b.running):
        b.finish(r, RequestStatus.FINISHED_ABORTED)
    assert kv.num_used_blocks == 0


def test_max_num_seqs_and_fcfs():
    b, _ = make(max_num_seqs=2)
    for i in range(4):
        b.add(req(str(i), 3))
    plan = b.schedule()
    assert [s.request.request_id for s in plan.seqs] == ["0", "1"]
    assert [r.request_id for r in b.waiting] == ["2", "3"]


def test_preemption_by_recompute_when_blocks_run_out():
    # room for one whole request (27 tokens = 7 blocks) but not for two
    b, kv = make(num_blocks=8, block_size=4, budget=64)
    old, new = req("old", 7, max_tokens=20), req("new", 7, max_tokens=20)
    b.add(old)
    b.add(new)
    fake_step(b, b.schedule())
    preempted_once = False
    for _ in range(100):
        plan = b.schedule()
        if plan.preempted:
            assert plan.preempted == [new] and new.status is RequestStatus.PREEMPTED
            assert new.num_computed_tokens == 0 and b.waiting[0] is new
            preempted_once = True
        if not plan.seqs:
            break
        fake_step(b, plan)
    assert preempted_once
    assert old.status is RequestStatus.FINISHED_LENGTH and old.num_output_tokens == 20
    assert new.status is RequestStatus.FINISHED_LENGTH and new.num_output_tokens == 20
    assert kv.num_used_blocks == 0


def test_finish_from_waiting_frees_nothing_twice():
    b, kv = make()
    r = req("w", 5)
    b.add(r)
    b.finish(r, RequestStatus.FINISHED_ABORTED)
    assert not b.waiting and kv.num_used_blocks == 0 and r.status.finished
