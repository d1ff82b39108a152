"""OpenAI response shapes: one accumulator per response, fed ChoiceEvents.

`chunk(event)` gives a streaming chunk (None when there is nothing to send yet: text
held back for a possible stop string); `final()` the non-streaming body.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.outputs import TokenLogprobs
from scheduler.api.generation import ChoiceEvent
from scheduler.api.tools import ToolCall, ToolPlan, ToolStream, read_calls
from scheduler.tokenizer import Tokenizer


@dataclass
class _Acc:
    text: str = ""
    finish_reason: str | None = None
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    wants_logprobs: bool = False
    timings: dict[str, float] | None = None
    streamed_chars: int = 0  # streaming: text length of the tokens whose logprobs went out (text_offset)


class Shape:
    object_name = ""
    chunk_name = ""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, num_prompts: int, n: int,
                 timings: bool = False):
        self.id, self.model, self.tokenizer = request_id, model, tokenizer
        self.timings = timings  # the client asked for per-phase timings (x-pdserve-timings header)
        self.created = int(time.time())
        self.n = n
        self.choices = [_Acc() for _ in range(num_prompts * n)]
        self.num_prompt_tokens = [0] * num_prompts

    def add(self, event: ChoiceEvent) -> _Acc:
        acc = self.choices[event.index]
        acc.text += event.text
        acc.num_tokens = event.num_output_tokens
        acc.logprobs.extend(event.logprobs)
        acc.wants_logprobs |= bool(event.logprobs)
        acc.finish_reason = event.finish_reason or acc.finish_reason
        acc.timings = event.timings or acc.timings
        self.num_prompt_tokens[event.index // self.n] = event.num_prompt_tokens
        return acc

    def usage(self) -> dict:
        prompt = sum(self.num_prompt_tokens)  # once per prompt, not per sample
        completion = sum(c.num_tokens for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def envelope(self, name: str, choices: list) -> dict:
        return {"id": self.id, "object": name, "created": self.created, "model": self.model, "choices": choices}

    def usage_chunk(self) -> dict:
        return {**self.envelope(self.chunk_name, []), "usage": self.usage()}

    def with_timings(self, choice: dict, timings: dict[str, float] | None) -> dict:
        if self.timings and timings:
            choice["timings"] = {name: round(v, 6) for name, v in timings.items()}
        return choice

    def token_str(self, token_id: int) -> str:
        return self.tokenizer.token_text(token_id)


class CompletionShape(Shape):
    object_name = chunk_name = "text_completion"

    def _logprobs(self, lps: list[TokenLogprobs], start: int = 0) -> dict:
        """start: where the first token's text begins in the choice's text (offsets count on from it)."""
        tokens = [self.token_str(lp.token_id) for lp in lps]
        offsets, at = [], start
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in lps],
                "top_logprobs": [{self.token_str(t): v for t, v in lp.top} for lp in lps], "text_offset": offsets}

    def chunk(self, event: ChoiceEvent) -> dict | None:
        acc = self.add(event)
        if not event.text and event.finish_reason is None and not event.logprobs:
            return None
        logprobs = self._logprobs(event.logprobs, acc.streamed_chars) if event.logprobs else None
        if logprobs:
            acc.streamed_chars = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self.envelope(self.chunk_name, [self.with_timings({
            "index": event.index, "text": event.text, "finish_reason": event.finish_reason,
            "logprobs": logprobs}, event.timings)])

    def final(self) -> dict:
        choices = [self.with_timings({"index": i, "text": c.text, "finish_reason": c.finish_reason,
                                      "logprobs": self._logprobs(c.logprobs) if c.wants_logprobs else None},
                                     c.timings) for i, c in enumerate(self.choices)]
        return {**self.envelope(self.object_name, choices), "usage": self.usage()}


class ChatShape(Shape):
    object_name, chunk_name = "chat.completion", "chat.completion.chunk"

    def _entry(self, token_id: int, logprob: float) -> dict:
        text = self.token_str(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    def _logprobs(self, lps: list[TokenLogprobs]) -> dict:
        return {"content": [{**self._entry(lp.token_id, lp.logprob),
                             "top_logprobs": [self._entry(t, v) for t, v in lp.top]} for lp in lps]}

    def __init__(self, *args, plan: ToolPlan = ToolPlan(), **kw):
        super().__init__(*args, **kw)
        self.plan = plan
        self.opened: set[int] = set()  # choices whose first chunk (the role) went out
        self.tool_streams = {i: ToolStream(plan) for i in range(len(self.choices))} if plan.active else {}
        self.forced_ids: dict[int, str] = {}

    def chunk(self, event: ChoiceEvent) -> dict | None:
        self.add(event)
        delta, finish = self._delta(event)
        if not delta and finish is None and not event.logprobs:
            return None
        if event.index not in self.opened:  # the role goes out with the choice's first content, as vLLM's
            self.opened.add(event.index)
            delta = {"role": "assistant", **delta}
        return self.envelope(self.chunk_name, [self.with_timings({
            "index": event.index, "delta": delta,
            "logprobs": self._logprobs(event.logprobs) if event.logprobs else None,
            "finish_reason": finish}, event.timings)])

    def _delta(self, event: ChoiceEvent) -> tuple[dict, str | None]:
        """The event's delta (content, or tool-call pieces) and finish reason."""
        stream = self.tool_streams.get(event.index)
        if stream is None:
            return ({"content": event.text} if event.text else {}), event.finish_reason
        content = stream.feed(event.text)
        delta: dict = {"content": content} if content else {}
        if self.plan.forced:
            call_id = self.forced_ids.get(event.index)
            piece: dict = {"index": 0, "function": {"arguments": event.text}}
            if call_id is None:
                call_id = self.forced_ids[event.index] = ToolCall(self.plan.forced, "").id
                piece = {"index": 0, "id": call_id, "type": "function",
                         "function": {"name": self.plan.forced, "arguments": event.text}}
            if event.text or "id" in piece:
                delta["tool_calls"] = [piece]
            return delta, "tool_calls" if event.finish_reason == "stop" else event.finish_reason
        if event.finish_reason is None:
            return delta, None
        held, calls = stream.finish()
        if held:
            delta["content"] = delta.get("content", "") + held
        if calls:
            delta["tool_calls"] = [{"index": i, **c.as_openai()} for i, c in enumerate(calls)]
            return delta, "tool_calls"
        return delta, event.finish_reason

    def _message(self, c: _Acc) -> tuple[dict, str | None]:
        if not self.plan.active:
            return {"role": "assistant", "content": c.text}, c.finish_reason
        content, calls = read_calls(self.plan, c.text)
        if not calls or (self.plan.forced and c.finish_reason != "stop"):
            return {"role": "assistant", "content": c.text}, c.finish_reason
        return ({"role": "assistant", "content": content, "tool_calls": [call.as_openai() for call in calls]},
                "tool_calls")

    def final(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            message, finish = self._message(c)
            choices.append(self.with_timings({"index": i, "message": message, "finish_reason": finish,
                                              "logprobs": self._logprobs(c.logprobs) if c.wants_logprobs else None},
                                             c.timings))
        return {**self.envelope(self.object_name, choices), "usage": self.usage()}
