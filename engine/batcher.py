"""Per-step batch planning under a token budget (no torch).

State: a FCFS `waiting` queue and a `running` list (order = priority, oldest first).
Each step:
1. every running request gets its remaining tokens (1 for a decode; the rest of a prompt
   otherwise, capped by the budget). When blocks run out the newest running request is
   preempted by recompute (blocks freed, re-queued at the head) until the older one fits;
2. if nothing was preempted, waiting requests are admitted in order while the budget,
   `max_num_seqs` and the pool allow, reusing cached prefix blocks. How a prompt enters
   depends on the prefill schedule (TECHNIQUES.md):
   - `chunked` (Sarathi-Serve): a prompt longer than what is left of the budget is chunked;
     its first token is sampled once it is complete;
   - `whole`: a prompt is computed in one step; one longer than the budget runs alone;
   - `layered`: waiting prompts (up to COHORT_TOKENS) form one cohort that goes through the
     model one layer group per step, beside every decode, and samples after the last group.
     The number of groups follows the cohort's size (`num_layer_groups`); one cohort is in
     flight at a time. The runner keeps the cohort's hidden states between steps.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.config import PrefillSchedule, as_enum
from engine.kv.manager import KVCacheManager
from engine.request import Request, RequestStatus

COHORT_TOKENS = 8192  # the most prompt tokens in one layered cohort
_GROUPS = ((512, 1), (1024, 2), (2048, 4), (4096, 8))  # cohort tokens -> layer groups; beyond: 16


def num_layer_groups(cohort_tokens: int, num_layers: int) -> int:
    """Layer groups for a cohort of this many new tokens: per-step prefill work stays near
    512 tokens through all layers (TECHNIQUES.md), at most one group per layer."""
    groups = next((g for limit, g in _GROUPS if cohort_tokens <= limit), 16)
    return min(groups, num_layers)


def layer_bounds(num_layers: int, num_groups: int, group: int) -> tuple[int, int]:
    """Layers [start, end) of group `group` out of num_groups contiguous near-equal groups."""
    return group * num_layers // num_groups, (group + 1) * num_layers // num_groups


@dataclass(slots=True)
class ScheduledSeq:
    request: Request
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this step completes the request's known tokens, so a token is sampled."""
        request = self.request
        return request.num_computed_tokens + self.num_new_tokens == len(request.all_token_ids)


@dataclass
class Cohort:
    """Layered prefill: prompts going through the layers together, one group per step."""

    seqs: list[ScheduledSeq]
    num_groups: int
    group: int = 0  # the group the next step runs


@dataclass
class CohortStep:
    """This step's share of the cohort: its seqs through layers [layer_start, layer_end)."""

    seqs: list[ScheduledSeq]
    layer_start: int
    layer_end: int
    first: bool  # hidden states start from the embeddings
    last: bool   # after these layers the cohort samples and joins the decodes


@dataclass
class StepPlan:
    seqs: list[ScheduledSeq] = field(default_factory=list)  # through every layer this step
    preempted: list[Request] = field(default_factory=list)
    cohort: CohortStep | None = None

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        """Every seq this step computes tokens for: the full-depth ones, then the cohort's."""
        return self.seqs + (self.cohort.seqs if self.cohort else [])

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def done(self) -> list[ScheduledSeq]:
        """Seqs whose new tokens are computed by the end of this step, in the runner's order."""
        return self.seqs + (self.cohort.seqs if self.cohort and self.cohort.last else [])

    @property
    def sampling(self) -> list[ScheduledSeq]:
        """Seqs that get a token this step, in the order the runner returns them."""
        return [s for s in self.done if s.samples]


class Batcher:
    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int,
                 schedule: str = "chunked", token_budget: int | None = None, num_layers: int = 1):
        schedule = as_enum(PrefillSchedule, schedule, "prefill schedule")
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_schedule = schedule
        self.token_budget = token_budget or max_num_batched_tokens  # chunked: tokens per step
        self.num_layers = num_layers
        self.waiting: deque[Request] = deque()
        self._waiting_tokens = 0  # prompt tokens of the waiting requests left to compute
        self.running: list[Request] = []
        self.cohort: Cohort | None = None

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)
        self._waiting_tokens += _pending(request)

    def add_running(self, request: Request) -> None:
        """A request whose prompt KV was computed elsewhere joins the decodes."""
        request.status = RequestStatus.RUNNING
        self.running.append(request)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + (len(self.cohort.seqs) if self.cohort else 0)

    @property
    def num_pending_prefill_tokens(self) -> int:
        """Prompt tokens queued, admitted or in the cohort, not yet computed (the load the
        engine reports, and the simulator's workers with it)."""
        cohort = [s.request for s in self.cohort.seqs] if self.cohort else []
        return self._waiting_tokens + sum(_pending(r) for r in (*self.running, *cohort)
                                          if r.num_computed_tokens < len(r.prompt_token_ids))

    def schedule(self) -> StepPlan:
        plan = StepPlan()
        layered = self.prefill_schedule == "layered"
        budget = self.token_budget if self.prefill_schedule == "chunked" else self.max_num_batched_tokens
        i, running, seqs = 0, self.running, plan.seqs
        chunked, allocate = self.prefill_schedule == "chunked", self.kv.allocate_slots
        while i < len(running) and (budget > 0 or layered):
            request = running[i]
            num_new = len(request.all_token_ids) - request.num_computed_tokens
            if chunked and num_new > budget:
                num_new = budget
            while not allocate(request, num_new):
                victim = running.pop()
                self._preempt(victim)
                plan.preempted.append(victim)
                if victim is request:
                    break
            else:
                seqs.append(ScheduledSeq(request, num_new))
                budget -= num_new
                i += 1
        if plan.preempted:
            return plan
        if layered:
            plan.cohort = self._cohort_step()
            return plan
        prefilled = False
        while self.waiting and len(self.running) < self.max_num_seqs:
            request = self.waiting[0]
            cached = self.kv.get_computed_blocks(request)
            num_cached = len(cached) * self.kv.block_size
            num_new = request.num_tokens - num_cached
            if self.prefill_schedule == "chunked":
                if budget <= 0:
                    break
                num_new = min(num_new, budget)
            elif num_new > budget and prefilled:  # whole: a prompt over the budget runs alone
                break
            if not self.kv.allocate_slots(request, num_new, cached):
                break
            self._admit(request, num_cached)
            self.running.append(request)
            plan.seqs.append(ScheduledSeq(request, num_new))
            budget -= num_new
            prefilled = True
        return plan

    def _admit(self, request: Request, num_cached: int) -> None:
        self.waiting.popleft()
        self._waiting_tokens -= _pending(request)
        request.num_computed_tokens = num_cached
        if request.status is RequestStatus.WAITING:
            request.num_cached_tokens = num_cached
        request.status = RequestStatus.RUNNING
        if request.timeline.first_scheduled_s is None:
            request.timeline.first_scheduled_s = time.monotonic()

    def _cohort_step(self) -> CohortStep | None:
        """Layered: the in-flight cohort's next layer group, or a new cohort from the waiting
        queue (whole prompts, up to COHORT_TOKENS; a longer one alone)."""
        if self.cohort is None:
            seqs: list[ScheduledSeq] = []
            tokens = 0
            while self.waiting and len(self.running) + len(seqs) < self.max_num_seqs:
                request = self.waiting[0]
                cached = self.kv.get_computed_blocks(request)
                num_cached = len(cached) * self.kv.block_size
                num_new = request.num_tokens - num_cached
                if seqs and tokens + num_new > COHORT_TOKENS:
                    break
                if not self.kv.allocate_slots(request, num_new, cached):
                    break
                self._admit(request, num_cached)
                seqs.append(ScheduledSeq(request, num_new))
                tokens += num_new
            if not seqs:
                return None
            self.cohort = Cohort(seqs, num_layer_groups(tokens, self.num_layers))
        cohort = self.cohort
        start, end = layer_bounds(self.num_layers, cohort.num_groups, cohort.group)
        cohort.group += 1
        last = cohort.group == cohort.num_groups
        step = CohortStep(list(cohort.seqs), start, end, start == 0, last)
        if last:
            self.running.extend(s.request for s in cohort.seqs)
            self.cohort = None
        return step

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Ends a request in any state and frees its blocks."""
        assert status.finished
        if self.cohort is not None and any(s.request is request for s in self.cohort.seqs):
            self.cohort.seqs = [s for s in self.cohort.seqs if s.request is not request]
            if not self.cohort.seqs:
                self.cohort = None
        elif request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        elif request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self.waiting.remove(request)
            self._waiting_tokens -= _pending(request)
        self.kv.free(request)
        request.status = status
        request.timeline.finish_s = time.monotonic()

    def _preempt(self, request: Request) -> None:
        self.kv.free(request)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self._waiting_tokens += _pending(request)


def _pending(request: Request) -> int:
    """Prompt tokens of a request not computed yet (none move while it waits)."""
    return max(0, request.num_prompt_tokens - request.num_computed_tokens)
