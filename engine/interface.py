"""The engine a worker drives: the one seam between the worker layer (loop thread, prefill
and decode roles, gRPC servicer, semi-PD) and an engine implementation.

Our own engine (engine/engine.py) is the first implementation; the worker layer calls
nothing else on it. One thread drives an engine (the loop's); every method below is called
on that thread. A request is validated once per process, where it enters (`validate`); the
methods that take a request assume it passed.

Disaggregation, decode side: `reserve_prefilled` holds the prompt's blocks (a cached prefix
shared), `receive_kv` writes each layer chunk into them, `give_first_token` hands over the
prefill side's token; once both are in, the request is admitted (`admit_prefilled`) and its
first output comes out of the next `step`. An engine that allocates blocks inside its own
step (vLLM's) answers `reserve_prefilled` with DEFERRED and names the request in `allocated()`
once they are held. Prefill side: `set_kv_sink` makes the engine ship every prompt's KV to the
sink, layer by layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

from engine.outputs import EngineInfo, EngineStats, StepOutput, TokenLogprobs
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.parallel.kv_link import KVLink
    from engine.transfer.base import KVSink, LayerChunk


DEFERRED = -1  # reserve_prefilled: accepted; the blocks are allocated in the engine's next step


@runtime_checkable
class WorkerEngine(Protocol):
    info: EngineInfo

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prefills: bool = True) -> None:
        """Raises RequestError for a request this engine cannot run (prefills: it would
        compute the prompt itself, not receive its KV)."""

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None, validated: bool = False) -> None:
        """Queues a request (n > 1: its samples) to prefill and decode here."""

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Ends the request (or its index-th sample) in any state and frees its blocks;
        False when there is no such request."""

    def step(self) -> list[StepOutput]:
        """Runs one batched step; the new tokens of every request that got one."""

    def has_work(self) -> bool:
        """Whether a step would do anything (a request waiting for its KV gives none)."""

    def has_request(self, request_id: str) -> bool:
        """Whether the request is still in the engine (any state but finished); also read,
        as a hint, from other threads."""

    def num_requests(self) -> int:
        """Requests in the engine, in any state but finished."""

    def stats(self) -> EngineStats: ...

    def close(self) -> None:
        """Stops what the engine started (processes, threads); the loop calls it once, last."""

    def set_kv_sink(self, sink: KVSink) -> None:
        """Makes this a prefill engine: every prompt's KV goes to sink, layer by layer."""

    def reserve_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          arrival_s: float | None = None, transfer_id: int = 0) -> int | None:
        """Holds blocks for a prompt a prefill engine will compute into them. Returns how many
        leading blocks are cached here already (not to be sent); None, changing nothing, when
        the pool has no room; or DEFERRED when the engine allocates them in its next step.
        transfer_id: what the KV travels under (an engine of several ranks tells the others)."""

    def open_kv_link(self, link: KVLink) -> None:
        """An engine of several ranks has the others join a KV link its first rank joins."""

    def close_kv_link(self, link_no: int) -> None:
        """... and leave it."""

    def allocated(self) -> list[tuple[str, int]]:
        """Requests answered DEFERRED whose blocks are now held, each with how many leading
        blocks were cached here (not to be sent); each is named once."""

    def waiting_for_kv(self, request_id: str) -> bool:
        """Whether the request's blocks are reserved and its KV or first token still awaited."""

    def receive_kv(self, chunk: LayerChunk) -> bool:
        """Writes one layer chunk into the request's reserved blocks (False: no such request
        waiting for its KV, e.g. aborted meanwhile; the chunk is dropped)."""

    def give_first_token(self, request_id: str, token_id: int, logprob: TokenLogprobs | None = None,
                         prefill_s: float = 0.0) -> bool:
        """The prefill side's first token (it took prefill_s of compute); the request is
        admitted once its KV has landed too, whichever comes last."""

    def admit_prefilled(self, request_id: str, first_token_id: int,
                        first_logprob: TokenLogprobs | None = None) -> StepOutput | None:
        """All layers have landed: the request joins the decodes with its first token."""
