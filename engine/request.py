"""Request state inside one engine.

Lifecycle: WAITING -> RUNNING (blocks held, num_computed_tokens advancing) -> FINISHED_*.
A RUNNING request short of blocks may be PREEMPTED: its blocks are freed, its computed
count drops to 0 and it waits again at the head of the queue; its generated tokens are
kept and recomputed as prompt (preemption by recompute). Abort is a finish from any state.

Disaggregated: on a decode engine a request starts WAITING_FOR_KV (prompt blocks reserved,
a prefill engine filling them layer by layer) and enters RUNNING with its prompt computed
and its first token given. On a prefill engine `num_sent_blocks` counts the blocks shipped.
"""

from __future__ import annotations

import enum

from engine.errors import ContextLengthExceeded, RequestError
from engine.outputs import Timeline, TokenLogprobs
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    WAITING_FOR_KV = "waiting_for_kv"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 eos_token_ids: tuple[int, ...], max_model_len: int, index: int = 0,
                 parent_id: str | None = None, arrival_s: float | None = None):
        self.request_id = request_id
        self.parent_id = parent_id or request_id
        self.index = index
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list[int] = []
        self.num_registered_blocks = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.num_sent_blocks = 0
        self.kv_predicted = bool(params.kv_prediction)  # prompt KV from a KV predictor: never prefix-cached
        self.kv_landed = False  # decode side: the prompt's last layer chunk has been written
        self.transfer_id = 0  # decode side: what its prompt's KV travels under (0: none named)
        self.first_token: tuple[int, TokenLogprobs | None] | None = None  # decode side, from prefill
        self.logprobs: list[TokenLogprobs] = []
        # with params.prompt_logprobs: one per prompt token as the prefill computes them (the first has none)
        self.prompt_logprobs: list[TokenLogprobs | None] = [None]
        self.timeline = Timeline() if arrival_s is None else Timeline(arrival_s=arrival_s)
        room = max_model_len - len(self.prompt_token_ids)
        self.max_tokens = room if params.max_tokens is None else min(params.max_tokens, room)
        self._stops = (() if params.ignore_eos else tuple(eos_token_ids)) + tuple(params.stop_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    @property
    def computing_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and its prefill has not produced them all: every prompt
        token is computed (never taken from the prefix cache)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    def append_token(self, token_id: int) -> RequestStatus | None:
        """Adds a sampled token; returns the finished status it causes, if any."""
        ids = self.all_token_ids  # (once per token per request: kept lean)
        ids.append(token_id)
        n = len(ids) - len(self.prompt_token_ids)
        if n >= self.params.min_tokens and token_id in self._stops:
            return RequestStatus.FINISHED_STOPPED
        if n >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (f"Request({self.request_id}, prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_ids)}, {self.status.name})")


def validate_request(prompt_token_ids: list[int], params: SamplingParams, max_model_len: int, vocab_size: int) -> None:
    """Raises RequestError for a request no engine of this model can run (engines call it, and
    so does the disaggregated front door, so bad input never reaches a worker)."""
    n = len(prompt_token_ids)
    if n == 0:
        raise RequestError("the prompt is empty", param="prompt")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 or t >= vocab_size for t in prompt_token_ids):
        raise RequestError(f"prompt token ids must be integers in [0, {vocab_size})", param="prompt")
    for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", [t for t, _ in params.logit_bias]),
                      ("allowed_token_ids", params.allowed_token_ids),
                      ("bad_words", [t for w in params.bad_words_ids for t in w])):
        if any(t >= vocab_size for t in ids):
            raise RequestError(f"{name}: token ids must be in [0, {vocab_size})", param=name)
    wanted = n + (params.max_tokens or 1)
    if n >= max_model_len or wanted > max_model_len:
        raise ContextLengthExceeded(
            f"This model's maximum context length is {max_model_len} tokens. However, you requested {wanted} "
            f"tokens ({n} in the prompt, {params.max_tokens or 1} for the completion). Please reduce the prompt "
            "or max_tokens.")
