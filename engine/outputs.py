"""What crosses the engine's boundary: step outputs, timelines, stats and the engine's
description. Torch-free: the front door, the scheduler and the wire conversions use them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Timeline:
    """Wall-clock marks (time.monotonic seconds) of one request's life; None = not reached.

    On a decode worker (disaggregated) `reserved_s` is when its prompt blocks were
    reserved; prefill start and end are placed on this worker's clock from the first token's
    arrival and the prefill worker's reported compute time, and `kv_*` describe the prompt's
    KV as it landed."""

    arrival_s: float = field(default_factory=time.monotonic)
    first_scheduled_s: float | None = None
    prefill_start_s: float | None = None
    prefill_end_s: float | None = None
    transfer_start_s: float | None = None
    transfer_end_s: float | None = None
    decode_queued_s: float | None = None
    decode_start_s: float | None = None
    first_token_s: float | None = None
    finish_s: float | None = None
    reserved_s: float | None = None
    kv_first_s: float | None = None
    kv_last_s: float | None = None
    kv_bytes: int = 0

    def phases(self, end_s: float | None = None) -> dict[str, float]:
        """Seconds spent in each phase reached so far (the `timings` a client may ask for):
        queue (to the first prefill step), prefill (to the first token), transfer (KV still
        landing after the first token: the part layer-wise sending did not hide), decode_queue
        (disaggregated: waiting for the decode worker's KV blocks; colocated: none) and decode
        (first token to finish, or to end_s). Disaggregated requests add kv_span (first to last
        KV chunk landed, overlapping prefill) and kv_bytes."""
        start = self.reserved_s if self.reserved_s is not None else self.arrival_s
        decode_queue = ((self.arrival_s, self.reserved_s) if self.reserved_s is not None
                        else (self.decode_queued_s, self.decode_start_s))
        spans = {"queue": (start, self.first_scheduled_s),
                 "prefill": (self.first_scheduled_s, self.prefill_end_s),
                 "transfer": (self.transfer_start_s, self.transfer_end_s),
                 "decode_queue": decode_queue,
                 "decode": (self.decode_start_s, self.finish_s or end_s),
                 "kv_span": (self.kv_first_s, self.kv_last_s)}
        out = {name: max(0.0, b - a) for name, (a, b) in spans.items() if a is not None and b is not None}
        if self.kv_bytes:
            out["kv_bytes"] = float(self.kv_bytes)
        return out


@dataclass
class TokenLogprobs:
    """Log-probability of a sampled token and the top alternatives at that step."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class StepOutput:
    """New tokens of one (request, index) from one step, or (error set, no tokens) why that
    request failed alone in the step and was ended."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    timeline: Timeline | None = None
    error: str | None = None
    error_status: int = 500  # with error: 400 when the request's own parameters caused it
    prompt_logprobs: list[TokenLogprobs | None] | None = None  # with the first token, when asked for (first: None)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_kv_blocks_used: int
    num_kv_blocks_total: int
    prefix_cache_queries_tokens: int
    prefix_cache_hit_tokens: int
    num_pending_prefill_tokens: int = 0  # prompt tokens admitted or queued but not yet computed
    weight_bytes_dense: int = 0   # since start: weights the steps read, experts apart
    weight_bytes_expert: int = 0  # since start: each expert counted once per layer run that routed to it
    prefill_s_per_token: float = 0.0  # measured: seconds per token of steps that prefill (moving average)
    kv_prediction_cost: float = 0.0   # predicted prefill's FLOPs as a share of full prefill's; 0: no predictor
    num_predicted_prefills: int = 0   # since start
    num_rank_restarts: int = 0  # times a tensor-parallel group started again (its KV links with it)


class RemoteTimeline(Timeline):
    """A timeline whose phases were measured elsewhere (another process's clock)."""

    def __init__(self, phases: dict[str, float]):
        super().__init__(arrival_s=0.0)
        self._phases = phases

    def phases(self, end_s: float | None = None) -> dict[str, float]:
        return dict(self._phases)


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves and holds, fixed once it is built."""

    max_model_len: int
    vocab_size: int
    block_size: int
    num_kv_blocks: int
    kv_block_shape: tuple[int, int, int]  # (block_size, num_kv_heads, head_dim) of one layer's K or V
    kv_dtype: str  # torch dtype name of the KV cache, e.g. "float32"
    device: str  # e.g. "cpu", "cuda:0"
    has_kv_predictor: bool = False
    tensor_parallel_size: int = 1  # ranks the model and its KV cache are split across
