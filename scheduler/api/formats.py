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
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    opened: bool = False  # its first chunk went out


class Shape:
    object_name = ""
    chunk_name = ""

    def __init__(self, request_id: str, model: str, tokenizer: Tokenizer, num_prompts: int, n: int,
                 timings: bool = False, prompt_logprobs: bool = False):
        self.id, self.model, self.tokenizer = request_id, model, tokenizer
        self.timings = timings  # the client asked for per-phase timings (x-pdserve-timings header)
        self.prompt_logprobs = prompt_logprobs  # the client asked for vLLM's prompt_logprobs field
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
        acc.prompt_logprobs = event.prompt_logprobs or acc.prompt_logprobs
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

    def _prompt_field(self, acc: _Acc) -> dict:
        """vLLM's prompt_logprobs on a choice: None, then {token id: {logprob, rank, decoded_token}}."""
        if acc.prompt_logprobs is None or not self.prompt_logprobs:
            return {}
        return {"prompt_logprobs": [None if lp is None else {
            str(t): {"logprob": v, "rank": r, "decoded_token": self.token_str(t)}
            for t, v, r in [(lp.token_id, lp.logprob, None), *((t, v, i + 1) for i, (t, v) in enumerate(lp.top))]}
            for lp in acc.prompt_logprobs]}


class CompletionShape(Shape):
    """echo: each prompt's text leads its choices' text (and with logprobs, the prompt's
    logprobs lead theirs; the first prompt token has none); echo_only: nothing generated is
    shown (echo with max_tokens 0)."""

    object_name = chunk_name = "text_completion"

    def __init__(self, *args, echo: list[tuple[str, list[int]]] | None = None, echo_only: bool = False, **kw):
        super().__init__(*args, **kw)
        self.echo, self.echo_only = echo, echo_only

    def _logprobs(self, lps: list[TokenLogprobs | None], start: int = 0, prompt: list[int] | None = None) -> dict:
        """start: where the first token's text begins in the choice's text (offsets count on from
        it); prompt: the ids of the leading prompt entries (None where a prompt token has no logprob)."""
        ids = [lp.token_id if lp is not None else prompt[i] for i, lp in enumerate(lps)]
        tokens = [self.token_str(t) for t in ids]
        offsets, at = [], start
        for token in tokens:
            offsets.append(at)
            at += len(token)
        return {"tokens": tokens, "token_logprobs": [lp.logprob if lp else None for lp in lps],
                "top_logprobs": [{self.token_str(t): v for t, v in lp.top} if lp else None for lp in lps],
                "text_offset": offsets}

    def _echoed(self, index: int, acc: _Acc) -> tuple[str, list]:
        """The prompt text and logprob entries that lead choice `index` (empty without echo)."""
        if self.echo is None:
            return "", []
        return self.echo[index // self.n][0], acc.prompt_logprobs or []

    def _shown(self, event: ChoiceEvent) -> ChoiceEvent:
        return event if not self.echo_only else ChoiceEvent(event.index, "", [], event.finish_reason and "length",
                                                            event.num_prompt_tokens, 0, event.timings,
                                                            event.prompt_logprobs)

    def chunk(self, event: ChoiceEvent) -> dict | None:
        event = self._shown(event)
        acc = super().add(event)
        text, lps = event.text, list(event.logprobs)
        prompt_ids = None
        if not acc.opened and self.echo is not None:
            lead, lead_lps = self._echoed(event.index, acc)
            text, lps, prompt_ids = lead + text, [*lead_lps, *lps], self.echo[event.index // self.n][1]
        if not text and event.finish_reason is None and not lps:
            return None
        acc.opened = True
        logprobs = self._logprobs(lps, acc.streamed_chars, prompt_ids) if lps else None
        if logprobs:
            acc.streamed_chars = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return self.envelope(self.chunk_name, [self.with_timings({
            "index": event.index, "text": text, "finish_reason": event.finish_reason,
            "logprobs": logprobs, **self._prompt_field(acc)}, event.timings)])

    def add(self, event: ChoiceEvent) -> _Acc:
        return super().add(self._shown(event)) if self.echo_only else super().add(event)

    def final(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            lead, lead_lps = self._echoed(i, c)
            lps = [*lead_lps, *c.logprobs]
            prompt_ids = self.echo[i // self.n][1] if self.echo is not None else None
            choices.append(self.with_timings({"index": i, "text": lead + c.text, "finish_reason": c.finish_reason,
                                              "logprobs": self._logprobs(lps, 0, prompt_ids) if c.wants_logprobs
                                              or lead_lps else None,
                                              **self._prompt_field(c)}, c.timings))
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
        self.tool_streams = {i: ToolStream(plan) for i in range(len(self.choices))} if plan.active else {}
        self.forced_ids: dict[int, str] = {}

    def chunk(self, event: ChoiceEvent) -> dict | None:
        acc = self.add(event)
        delta, finish = self._delta(event)
        if not delta and finish is None and not event.logprobs:
            return None
        extra = {}
        if not acc.opened:  # the role goes out with the choice's first content, as vLLM's
            acc.opened = True
            delta = {"role": "assistant", **delta}
            extra = self._prompt_field(self.choices[event.index]) if event.index == 0 else {}
        return {**self.envelope(self.chunk_name, [self.with_timings({
            "index": event.index, "delta": delta,
            "logprobs": self._logprobs(event.logprobs) if event.logprobs else None,
            "finish_reason": finish}, event.timings)]), **extra}

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
        return {**self.envelope(self.object_name, choices), "usage": self.usage(), **self._prompt_field(self.choices[0])}
