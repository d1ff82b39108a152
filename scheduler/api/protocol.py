"""OpenAI request bodies (pydantic) and their translation to SamplingParams.

Bodies are parsed strictly: an integer field takes only an integer (not `true`, not `2.0`),
a boolean only `true` or `false`, and no number may be infinite or NaN. Type errors become
400s with the offending field named; value checks live in SamplingParams so the offline API
and the server refuse the same things.
Fields beyond OpenAI's that vLLM users know (top_k, min_p, repetition_penalty, min_tokens,
ignore_eos, stop_token_ids, skip_special_tokens, allowed_token_ids, bad_words,
structured_outputs and the older guided_json / guided_regex / guided_choice / guided_grammar)
are accepted too, and pdserve's own `kv_prediction` (true: prefill from the server's KV
predictor; false: never; unset: when full prefill would miss the TTFT SLO).

A field no model here defines is not silently dropped: NEVER_SUPPORTED lists what OpenAI
defines and pdserve refuses (400 naming it); any other unknown field is logged once and
counted, or refused with --strict-fields (scheduler/api/server.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from engine.errors import RequestError
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredKind, StructuredOutput

DEFAULT_COMPLETION_MAX_TOKENS = 16


STRICT = ConfigDict(strict=True, allow_inf_nan=False)
CLOSED = ConfigDict(STRICT, extra="forbid")  # nested objects: an unknown key is a 400 naming it

# fields OpenAI defines that pdserve refuses when set (not null, not false), and why
NEVER_SUPPORTED = {
    "audio": "audio output is not supported",
    "modalities": "only text output is supported",
    "prediction": "predicted outputs are not supported",
    "store": "pdserve stores no completions",
    "metadata": "pdserve stores no completions",
    "service_tier": "pdserve has no service tiers",
    "web_search_options": "web search is not supported",
    "functions": "the deprecated functions field is not supported; use tools",
    "function_call": "the deprecated function_call field is not supported; use tool_choice",
    "best_of": "best_of is not supported; use n",
}


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(CLOSED, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    model_config = CLOSED

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    model_config = CLOSED

    json_: dict | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class _Sampling(BaseModel):
    model_config = ConfigDict(STRICT, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    # vLLM-style extras
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[str, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: int | None = None  # vLLM: each prompt token's logprob (and this many alternatives)
    # pdserve: prefill from a KV predictor's KV (true), never (false), or as the TTFT-SLO policy says (unset)
    kv_prediction: bool | None = None

    def unknown_fields(self) -> list[str]:
        """Fields of the body no model here defines; raises RequestError for one pdserve refuses."""
        extra = self.model_extra or {}
        for name, value in extra.items():
            if name in NEVER_SUPPORTED and value not in (None, False):
                raise RequestError(f"{name}: {NEVER_SUPPORTED[name]}", param=name)
        return [name for name in extra if name not in NEVER_SUPPORTED]

    def structured(self) -> StructuredOutput | None:
        """The output constraint, from whichever one field sets it."""
        found: list[tuple[str, StructuredOutput]] = []
        rf = self.response_format
        if rf is not None and rf.type == "json_object":
            found.append(("response_format", StructuredOutput(StructuredKind.JSON_OBJECT)))
        elif rf is not None and rf.type == "json_schema":
            if rf.json_schema is None or rf.json_schema.schema_ is None:
                raise RequestError("response_format json_schema needs json_schema.schema", param="response_format")
            found.append(("response_format", StructuredOutput.json_schema(rf.json_schema.schema_)))
        so = self.structured_outputs
        if so is not None:
            kinds = [(k, v) for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                                         ("grammar", so.grammar), ("json_object", so.json_object)) if v]
            if len(kinds) != 1:
                raise RequestError("structured_outputs sets exactly one of json, regex, choice, grammar, json_object",
                                   param="structured_outputs")
            found.append(("structured_outputs", _constraint(*kinds[0])))
        for name, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                           ("guided_grammar", "grammar")):
            if getattr(self, name) is not None:
                found.append((name, _constraint(kind, getattr(self, name))))
        if len(found) > 1:
            raise RequestError(f"one output constraint per request ({' and '.join(n for n, _ in found)} are set)",
                               param=found[1][0])
        return found[0][1] if found else None

    def _params(self, max_tokens: int | None, logprobs: int | None) -> SamplingParams:
        if self.stream_options is not None and not self.stream:
            raise RequestError("stream_options is only allowed with stream: true", param="stream_options")
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, min_tokens=self.min_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k, min_p=self.min_p,
            seed=self.seed, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            stop=tuple([self.stop] if isinstance(self.stop, str) else (self.stop or ())),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=self.ignore_eos,
            logprobs=logprobs, skip_special_tokens=self.skip_special_tokens, kv_prediction=self.kv_prediction,
            logit_bias=_logit_bias(self.logit_bias), allowed_token_ids=tuple(self.allowed_token_ids or ()),
            structured=self.structured(), prompt_logprobs=self.prompt_logprobs)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _constraint(kind: str, value) -> StructuredOutput:
    if kind == "json":
        return StructuredOutput.json_schema(value)
    if kind == "json_object":
        return StructuredOutput(StructuredKind.JSON_OBJECT)
    if kind == "choice":
        return StructuredOutput.choice(value)
    return StructuredOutput(StructuredKind(kind), value)


def _logit_bias(bias: dict[str, float] | None) -> tuple[tuple[int, float], ...]:
    """OpenAI's logit_bias keys are token ids as strings."""
    out = []
    for key, value in (bias or {}).items():
        if not key.isdigit():
            raise RequestError(f"logit_bias: {key!r} is not a token id", param="logit_bias")
        out.append((int(key), value))
    return tuple(out)


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise RequestError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its logprobs) back, nothing generated."""
        return self.echo and self.max_tokens == 0

    def sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise RequestError("suffix is not supported", param="suffix")
        max_tokens = DEFAULT_COMPLETION_MAX_TOKENS if self.max_tokens is None else self.max_tokens
        params = self._params(1 if self.echo_only else max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None:  # the prompt's logprobs lead the choice's
            want = max(self.logprobs, self.prompt_logprobs or 0)
            params = replace(params, prompt_logprobs=want)
        return params


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class CalledFunction(BaseModel):
    model_config = CLOSED

    name: str
    arguments: str


class AssistantToolCall(BaseModel):
    model_config = CLOSED

    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class ChatMessage(BaseModel):
    model_config = CLOSED

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[AssistantToolCall] | None = None  # an assistant turn's calls
    tool_call_id: str | None = None  # a tool turn: the call it answers

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        out = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            if self.role != "assistant":
                raise RequestError("only assistant messages carry tool_calls", param="messages")
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.role == "tool":
            if self.tool_call_id is None:
                raise RequestError("a tool message needs tool_call_id", param="messages")
            out["tool_call_id"] = self.tool_call_id
        return out


class FunctionSpec(BaseModel):
    model_config = CLOSED

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = CLOSED

    type: Literal["function"]
    function: FunctionSpec


class NamedToolChoice(BaseModel):
    model_config = CLOSED

    type: Literal["function"]
    function: dict[str, str]


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the reply continues the last (assistant) message
    chat_template_kwargs: dict | None = None  # extra variables for the chat template (e.g. enable_thinking)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    def sampling_params(self) -> SamplingParams:
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
        if self.continue_final_message and (self.add_generation_prompt or self.messages[-1].role != "assistant"):
            raise RequestError("continue_final_message needs the last message from the assistant and "
                               "add_generation_prompt: false", param="continue_final_message")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(max_tokens, logprobs)
