"""What a vLLM engine and pdserve's connector share inside one worker process.

vLLM builds the connector itself (one instance on its scheduler side, one on its worker
side), from a module path and a config; the config carries the key of this process's
Bridge, through which the connector reaches the engine's state and the engine reaches the
KV cache the connector was given. Everything here is touched on the engine loop's thread
(vLLM's scheduler and model run in it), so nothing is locked.

Producer (prefill) side: `sink` is where layer chunks go. Consumer (decode) side: one
`Inbound` per request whose prompt KV a prefill worker computes, from the moment it is
added (`expect`) until its KV has landed or it ended.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.outputs import Timeline

if TYPE_CHECKING:
    from engine.transfer.base import KVSink

PRODUCE, CONSUME = "pdserve_produce", "pdserve_consume"  # keys of a request's kv_transfer_params

_BRIDGES: dict[str, "Bridge"] = {}
_keys = itertools.count()


@dataclass
class Inbound:
    """A request on a decode engine whose prompt KV comes from a prefill worker."""

    request_id: str
    num_prompt_tokens: int
    timeline: Timeline
    vllm_id: str | None = None  # vLLM's own id, once its scheduler saw the request
    block_ids: list[int] = field(default_factory=list)  # the request's blocks, once allocated
    num_local_blocks: int = 0  # leading blocks its prefix cache held (not sent)
    allocated: bool = False
    landed: bool = False  # the last chunk was written


class Bridge:
    def __init__(self) -> None:
        self.key = f"pdserve-{next(_keys)}"
        self.sink: KVSink | None = None
        self.kv_layers: list[Any] = []  # per layer, vLLM's paged KV tensor (the worker side registers them)
        self.block_dim = 0  # the axis of a layer's tensor that indexes blocks
        self.block_shape: tuple[int, int, int] = (0, 0, 0)  # (block size, KV heads, head size): a chunk's framing
        self.inbound: dict[str, Inbound] = {}  # pdserve request id -> its inbound KV
        self.allocated: list[tuple[str, int]] = []  # (request id, leading blocks cached) since last taken
        self.loads_done: set[str] = set()  # vLLM ids to report as loaded (or given up) at the next step
        _BRIDGES[self.key] = self

    @staticmethod
    def get(key: str) -> "Bridge":
        return _BRIDGES[key]

    def close(self) -> None:
        _BRIDGES.pop(self.key, None)

    def expect(self, request_id: str, num_prompt_tokens: int, timeline: Timeline) -> Inbound:
        inbound = self.inbound[request_id] = Inbound(request_id, num_prompt_tokens, timeline)
        return inbound

    def take_allocated(self) -> list[tuple[str, int]]:
        allocated, self.allocated = self.allocated, []
        return allocated

    def take_loads_done(self) -> set[str]:
        done, self.loads_done = self.loads_done, set()
        return done

    def end(self, request_id: str) -> None:
        """The request ended: blocks vLLM holds for a load still awaited are released at the
        next step (vLLM frees an aborted request's blocks only once its load is reported)."""
        inbound = self.inbound.pop(request_id, None)
        if inbound is not None and inbound.allocated and not inbound.landed and inbound.vllm_id is not None:
            self.loads_done.add(inbound.vllm_id)
