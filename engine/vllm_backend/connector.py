"""pdserve's KV connector for vLLM (vLLM's KVConnectorBase_V1, loaded by module path).

vLLM makes two instances in the worker's process, one for its scheduler and one for its
model runner; both reach the engine's Bridge (engine/vllm_backend/bridge.py) by the key in
`kv_connector_extra_config`.

Producer (a request whose prompt a decode worker awaits: its kv_transfer_params name it,
and the prefill role routed it to a link): each step the scheduler side lists, per such
request, its blocks, the first block not yet sent complete and the prompt tokens the step
computes. During the forward vLLM calls `save_kv_layer` after each layer; the worker side
copies out that layer's blocks from that first one to the one holding the step's last token
and hands them to the link's sender thread, so layer i travels while layer i+1 computes. So
a prefix this engine had cached (not computed by any step) goes with the first step, a
chunk's partial last block goes again with the next chunk, and blocks the receiver holds in
its own prefix cache are never sent. A step with no such request returns at the first check.

Consumer: a request the decode engine added to receive its prompt is reported as matched
externally with an asynchronous load, so vLLM allocates all its blocks and parks it; the
scheduler side records the blocks and the prefix-cache hit for the engine, which then asks a
prefill worker for the rest and writes the chunks that land into the blocks between steps.
The worker side reports the request as loaded once the last chunk is in (vLLM then
schedules it, recomputing the last prompt token to sample the first token itself), and
also when it ended before that, so vLLM frees its blocks.

Chunks carry a layer's blocks in the engine's own layout ([blocks, heads, tokens, K|V] on
CPU), packed as one buffer; both sides of a link run this engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.model_executor.models.utils import extract_layer_index

from engine.transfer.base import LayerChunk
from engine.vllm_backend.bridge import CONSUME, PRODUCE, Bridge

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request


@dataclass
class Send:
    """One producer request's part of a step: the prompt tokens [start, end) it computes."""

    request_id: str
    block_ids: list[int]
    first_block: int  # the first block not yet sent complete
    end: int
    num_prompt_tokens: int


@dataclass
class StepSends(KVConnectorMetadata):
    sends: list[Send] = field(default_factory=list)


@dataclass
class _Outbound:
    request_id: str
    num_prompt_tokens: int
    block_ids: list[int] = field(default_factory=list)
    num_sent_blocks: int = 0  # blocks sent complete (a prefix this engine had cached is sent too)


class PdserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self.bridge = Bridge.get(self._kv_transfer_config.get_from_extra_config("bridge", ""))
        self.block_size = vllm_config.cache_config.block_size
        self.num_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self._outbound: dict[str, _Outbound] = {}  # scheduler side: vLLM id -> producer request
        self._local_tokens: dict[str, int] = {}  # scheduler side: vLLM id -> prefix-cache hit (tokens)
        self._layer_index: dict[str, int] = {}  # worker side: layer name -> index

    # scheduler side

    def on_new_request(self, request: Request) -> None:
        params = request.kv_transfer_params or {}
        if PRODUCE in params:
            self._outbound[request.request_id] = _Outbound(params[PRODUCE], request.num_prompt_tokens)
        elif CONSUME in params and params[CONSUME] in self.bridge.inbound:
            self.bridge.inbound[params[CONSUME]].vllm_id = request.request_id

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params or {}
        inbound = self.bridge.inbound.get(params.get(CONSUME, ""))
        if inbound is None or inbound.allocated:
            return 0, False
        self._local_tokens[request.request_id] = num_computed_tokens
        return request.num_tokens - num_computed_tokens, True

    def update_state_after_alloc(self, request: Request, blocks, num_external_tokens: int) -> None:
        if not num_external_tokens:
            return
        inbound = self.bridge.inbound.get((request.kv_transfer_params or {}).get(CONSUME, ""))
        if inbound is None:
            return
        inbound.block_ids = list(blocks.get_block_ids()[0])
        inbound.num_local_blocks = self._local_tokens.pop(request.request_id, 0) // self.block_size
        inbound.allocated = True
        self.bridge.allocated.append((inbound.request_id, inbound.num_local_blocks))

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = StepSends()
        if not self._outbound:
            return meta
        steps = scheduler_output.num_scheduled_tokens
        for new in scheduler_output.scheduled_new_reqs:
            out = self._outbound.get(new.req_id)
            if out is not None:
                out.block_ids = list(new.block_ids[0])
                self._plan(meta, out, new.num_computed_tokens, steps[new.req_id])
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            out = self._outbound.get(req_id)
            if out is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids and new_blocks is not None:
                out.block_ids = list(new_blocks[0])  # preempted and resumed: recomputed into new blocks
            elif new_blocks is not None:
                out.block_ids.extend(new_blocks[0])
            self._plan(meta, out, cached.num_computed_tokens[i], steps[req_id])
        return meta

    def _plan(self, meta: StepSends, out: _Outbound, start: int, num_tokens: int) -> None:
        if start < out.num_prompt_tokens:
            end = min(start + num_tokens, out.num_prompt_tokens)
            meta.sends.append(Send(out.request_id, list(out.block_ids), out.num_sent_blocks, end, out.num_prompt_tokens))
            out.num_sent_blocks = end // self.block_size

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        self._outbound.pop(request.request_id, None)
        self._local_tokens.pop(request.request_id, None)
        return False, None  # sends copy the blocks out: vLLM may free them at once

    # worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        names = sorted(kv_caches, key=extract_layer_index)
        self._layer_index = {name: i for i, name in enumerate(names)}
        layers = [kv_caches[name] for name in names]
        num_blocks = self._kv_cache_config.num_blocks
        self.bridge.block_dim = next(d for d, size in enumerate(layers[0].shape) if size == num_blocks)
        self.bridge.kv_layers = layers

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        pass  # landed chunks were written between steps

    def wait_for_layer_load(self, layer_name: str) -> None:
        pass

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        sends = self._get_connector_metadata().sends
        sink = self.bridge.sink
        if not sends or sink is None:
            return
        layer = self._layer_index[layer_name]
        bs, dim = self.block_size, self.bridge.block_dim
        for s in sends:
            held = sink.blocks_held(s.request_id)
            if held is None:
                continue  # prefilled where it decodes: nobody awaits its KV
            first, last = max(s.first_block, held), (s.end - 1) // bs
            if first > last:
                continue  # within what the receiver holds
            ids = torch.tensor(s.block_ids[first:last + 1], device=kv_layer.device)
            packed = kv_layer.index_select(dim, ids).reshape(2, len(ids), *self.bridge.block_shape)
            done = s.end >= s.num_prompt_tokens and layer == self.num_layers - 1
            sink.send(LayerChunk(s.request_id, layer, first, packed, last=done))

    def wait_for_save(self) -> None:
        pass  # the chunks are copies, on their way on the sender's thread

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        done = self.bridge.take_loads_done()
        return None, done or None
