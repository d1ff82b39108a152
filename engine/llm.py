"""Offline batch generation shaped like vLLM's `LLM` (text in, text out).

    llm = LLM()                                  # default SmolLM2, or LLM(model=path, **EngineConfig fields)
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32))
    outs[0].text, outs[0].token_ids, outs[0].finish_reason, outs[0].outputs[i] (n > 1)
    llm.generate([{"prompt": "Hi"}, {"prompt_token_ids": [1, 2, 3]}])
    llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=32))

Differences from vLLM's shapes: `RequestOutput.text`, `.token_ids` and `.finish_reason` are
shortcuts to the first sample; logprobs are TokenLogprobs (token id, logprob, top list), not
dicts of Logprob; `use_tqdm` is accepted and draws no bar (generation runs to the end either way).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from engine.config import EngineConfig
from engine.engine import Engine
from engine.request import TokenLogprobs
from engine.sampling_params import SamplingParams


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None

    @property
    def cumulative_logprob(self) -> float | None:
        """Sum of the sampled tokens' logprobs (with logprobs asked for; else None, as vLLM)."""
        return sum(lp.logprob for lp in self.logprobs) if self.logprobs is not None else None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    num_cached_tokens: int = 0

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def finished(self) -> bool:
        return all(o.finish_reason is not None for o in self.outputs)


class LLM:
    def __init__(self, model: str | None = None, **engine_config):
        from scheduler.tokenizer import Tokenizer
        self.engine = Engine(EngineConfig(model=model, **engine_config))
        self.tokenizer = Tokenizer.load(self.engine.model_path)
        self._ids = itertools.count()

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True, tools: list[dict] | None = None,
             chat_template_kwargs: dict | None = None) -> list[RequestOutput]:
        """One conversation (a list of messages) or several, through the model's chat template."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt, tools,
                                                      template_kwargs=chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """prompts: a string, token ids, a {"prompt": ...} or {"prompt_token_ids": [...]} dict, or a list
        of any of them."""
        from scheduler.tokenizer import TextStream
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params or SamplingParams()
        params_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError("need one SamplingParams per prompt")
        results: dict[str, RequestOutput] = {}
        streams: dict[tuple[str, int], TextStream] = {}
        order = []
        try:
            for prompt, p in zip(prompts, params_list):
                ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
                rid = str(next(self._ids))
                self.engine.add_request(rid, ids, p)
                order.append(rid)
                results[rid] = RequestOutput(rid, prompt if isinstance(prompt, str) else None, ids,
                                             [CompletionOutput(i, logprobs=[] if p.logprobs is not None else None)
                                              for i in range(p.n)])
                for i in range(p.n):
                    streams[rid, i] = TextStream(self.tokenizer, ids, p.stop, p.skip_special_tokens)
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    res = results[out.request_id]
                    comp = res.outputs[out.index]
                    res.num_cached_tokens = max(res.num_cached_tokens, out.num_cached_tokens)
                    stream = streams[out.request_id, out.index]
                    if comp.finish_reason is not None:
                        continue
                    comp.token_ids.extend(out.new_token_ids)
                    if comp.logprobs is not None:
                        comp.logprobs.extend(out.new_logprobs)
                    stream.add(out.new_token_ids)
                    if stream.stopped:
                        comp.finish_reason = "stop"
                        self.engine.abort(out.request_id, out.index)
                    elif out.finished:
                        comp.finish_reason = out.finish_reason
            for (rid, i), stream in streams.items():
                results[rid].outputs[i].text = stream.text
        finally:
            for rid in order:
                self.engine.abort(rid)
        return [results[rid] for rid in order]


def _prompt(p):
    """A prompt in any of the forms generate takes, as text or token ids."""
    if isinstance(p, dict):
        if "prompt_token_ids" in p:
            return list(p["prompt_token_ids"])
        if "prompt" in p:
            return p["prompt"]
        raise ValueError("a dict prompt has prompt or prompt_token_ids")
    return p
