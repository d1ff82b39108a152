"""Per-step batch planning under a token budget (no torch).

State: a FCFS `waiting` queue and a `running` list (order = priority, oldest first).
Each step:
1. every running request gets its remaining tokens (1 for a decode; the rest of a prompt
   otherwise, capped by the budget). When blocks run out the newest running request is
   preempted by recompute (blocks freed, re-queued at the head) until the older one fits;
2. if nothing was preempted, waiting requests are admitted in order while the budget,
   `max_num_seqs` and the pool allow, reusing cached prefix blocks. A prompt longer than
   what is left of the budget is chunked; its first token is sampled once it is complete.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus


@dataclass
class ScheduledSeq:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step completes the request's known tokens, so a token is sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.seqs)


class Batcher:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def add_running(self, request: Request) -> None:
        """A request whose prompt KV was computed elsewhere joins the decodes."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        budget = self.max_num_batched_tokens
        now = time.monotonic()
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            while not self.kv.allocate_slots(request, num_new):
                victim = self.running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
            else:
                plan.seqs.append(ScheduledSeq(request, num_new))
                budget -= num_new
                i += 1
        if plan.preempted:
            return plan
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.get_computed_blocks(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = min(request.num_tokens - num_cached, budget)
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self.waiting.popleft()
            request.num_computed_tokens = num_cached
            if request.status is RequestStatus.WAITING:
                request.num_cached_tokens = num_cached
            request.status = RequestStatus.RUNNING
            if request.timeline.first_scheduled_s is None:
                request.timeline.first_scheduled_s = now
            self.running.append(request)
            plan.seqs.append(ScheduledSeq(request, num_new))
            budget -= num_new
        return plan

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request in any state and frees its blocks."""
        assert status.finished
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
        self.kv.free(request)
        request.status = status
        request.timeline.finish_s = time.monotonic()

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
