"""One prompt's samples through an EngineClient: token deltas in, text events out.

`generate_events` turns the engine's StepOutputs into ChoiceEvents (text delta, new
logprobs, finish reason), applies stop strings (ending that sample in the engine) and
records latency metrics. `merge` interleaves several prompts' events for one response.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass

from engine.outputs import StepOutput, TokenLogprobs
from engine.sampling_params import SamplingParams
from scheduler.engine_client import EngineClient
from scheduler.metrics import ServerMetrics
from scheduler.tokenizer import TextStream, Tokenizer


@dataclass
class ChoiceEvent:
    index: int
    text: str
    logprobs: list[TokenLogprobs]
    finish_reason: str | None
    num_prompt_tokens: int
    num_output_tokens: int
    timings: dict[str, float] | None = None  # phase seconds, on a sample's last event
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # on a sample's first event, when asked for


class _Sample:
    """One sample's text and timing as its tokens arrive."""

    def __init__(self, stream: TextStream):
        self.stream = stream
        self.num_tokens = 0
        self.first_token_s: float | None = None
        self.last_token_s: float | None = None
        self.finish_reason: str | None = None


class _Tracker:
    def __init__(self, client: EngineClient, request_id: str, num_prompt: int, samples: list[_Sample],
                 index_base: int, metrics: ServerMetrics):
        self.client, self.request_id, self.num_prompt = client, request_id, num_prompt
        self.samples, self.index_base, self.metrics = samples, index_base, metrics
        self.arrival_s = time.monotonic()

    @property
    def done(self) -> bool:
        return all(s.finish_reason is not None for s in self.samples)

    def on_output(self, out: StepOutput) -> ChoiceEvent | None:
        sample, m = self.samples[out.index], self.metrics
        if sample.finish_reason is not None:
            return None  # tokens generated after a stop string, before the abort landed
        now = time.monotonic()
        if sample.first_token_s is None:
            sample.first_token_s = now
            m.ttft.observe(now - self.arrival_s)
            m.vllm.first_token(now - self.arrival_s)
            m.cached_tokens.inc(out.num_cached_tokens)
            if out.timeline and out.timeline.first_scheduled_s is not None:
                m.queue.observe(max(0.0, out.timeline.first_scheduled_s - self.arrival_s))
        else:
            m.itl.observe(now - sample.last_token_s)
            m.vllm.token_gap(now - sample.last_token_s)
        sample.last_token_s = now
        sample.num_tokens += len(out.new_token_ids)
        m.generation_tokens.inc(len(out.new_token_ids))
        m.vllm.tokens(generated=len(out.new_token_ids))
        sample.stream.add(out.new_token_ids)
        finish = out.finish_reason
        if sample.stream.stopped:
            finish = "stop"
            if not out.finished:
                self.client.abort(self.request_id, out.index)
        timings = None
        if finish is not None:
            timings = out.timeline.phases(end_s=now) if out.timeline else None
            if timings:
                m.observe_phases(timings)
            sample.finish_reason = finish
            m.finished.labels(finish).inc()
            m.e2e.observe(now - self.arrival_s)
            tpot = (now - sample.first_token_s) / (sample.num_tokens - 1) if sample.num_tokens > 1 else None
            if tpot is not None:
                m.tpot.observe(tpot)
            m.judge(sample.first_token_s - self.arrival_s, tpot)
            m.vllm.finished(finish, now - self.arrival_s, tpot, self.num_prompt, sample.num_tokens, timings)
            if self.done:
                m.vllm.request_done(max(s.num_tokens for s in self.samples))
        return ChoiceEvent(self.index_base + out.index, sample.stream.delta(final=finish is not None),
                           out.new_logprobs, finish, self.num_prompt, sample.num_tokens, timings, out.prompt_logprobs)


async def generate_events(client: EngineClient, tokenizer: Tokenizer, request_id: str,
                          prompt_ids: list[int], params: SamplingParams, metrics: ServerMetrics,
                          index_base: int = 0) -> AsyncIterator[ChoiceEvent]:
    samples = [_Sample(TextStream(tokenizer, prompt_ids, params.stop, params.skip_special_tokens))
               for _ in range(params.n)]
    tracker = _Tracker(client, request_id, len(prompt_ids), samples, index_base, metrics)
    metrics.prompt_tokens.inc(len(prompt_ids))
    metrics.vllm.tokens(prompt=len(prompt_ids))
    async with aclosing(client.generate(request_id, prompt_ids, params, arrival_s=tracker.arrival_s)) as outputs:
        async for out in outputs:
            event = tracker.on_output(out)
            if event is not None:
                yield event
            if tracker.done:
                return


async def merge(streams: list[AsyncIterator[ChoiceEvent]]) -> AsyncIterator[ChoiceEvent]:
    """Events of several prompts as they come; cancelling the merge closes every stream."""
    if len(streams) == 1:
        async with aclosing(streams[0]) as only:
            async for event in only:
                yield event
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(stream):
        try:
            async for event in stream:
                await queue.put(event)
            await queue.put(done)
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.create_task(pump(s)) for s in streams]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for s in streams:
            await s.aclose()
