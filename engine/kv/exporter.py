"""Per-step export of prompt KV on a prefill engine, one layer at a time.

Before a step, `plan` lists for each prefilling request the run of block indices this step
writes: from the first block not yet sent complete to the block holding the step's last
token (a layered cohort's whole prompt, for the layers of its group). The runner calls
`layer_done(i)` after layer i; each request's run is exported from
the cache for that layer and given to the sink. After the step, blocks that are now full
count as sent; a partially filled last block goes again with the next chunk. Blocks the
receiver holds already (`KVSink.blocks_held`: its cached prefix) are never sent, and a
request nobody awaits (prefilled where it decodes) exports nothing. `rank_runs` names the
same runs for the other ranks of a tensor-parallel engine, which ship their own KV heads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.batcher import StepPlan
from engine.kv.cache import KVCache
from engine.parallel.kv_link import encode_runs
from engine.transfer.base import KVSink, LayerChunk


@dataclass
class _Run:
    request_id: str
    block_ids: list[int]
    first_block: int
    prompt_done: bool


class LayerExporter:
    def __init__(self, cache: KVCache, sink: KVSink, num_layers: int):
        self.cache, self.sink, self.num_layers = cache, sink, num_layers
        self.runs: list[_Run] = []
        self.layer_times_s: list[float] = []  # when each layer's sends were issued (last step)

    def plan(self, plan: StepPlan) -> None:
        bs = self.cache.block_size
        self.runs = []
        self.layer_times_s = []
        for seq in plan.scheduled:
            r = seq.request
            end = seq.start + seq.num_new_tokens
            held = self.sink.blocks_held(r.request_id)
            if seq.start >= r.num_prompt_tokens or held is None:
                continue  # decoding, or prefilled where it decodes: nothing to send
            first, last = max(r.num_sent_blocks, held), (end - 1) // bs
            if first > last:
                continue  # this chunk lies within what the receiver holds
            self.runs.append(_Run(r.request_id, r.block_ids[first:last + 1], first, end >= r.num_prompt_tokens))

    def rank_runs(self) -> list[int]:
        """This step's runs as the other ranks of a tensor-parallel engine read them (those the
        sink names a link and transfer for)."""
        named = [(self.sink.transfer(run.request_id), run) for run in self.runs]
        return encode_runs([(*t, run.first_block, run.prompt_done, run.block_ids) for t, run in named if t is not None])

    def layer_done(self, layer: int) -> None:
        self.layer_times_s.append(time.monotonic())
        for run in self.runs:
            packed = self.cache.export_blocks(layer, run.block_ids)
            self.sink.send(LayerChunk(run.request_id, layer, run.first_block, packed,
                                      last=run.prompt_done and layer == self.num_layers - 1))

    def finish(self, plan: StepPlan) -> None:
        bs = self.cache.block_size
        for seq in plan.done:
            seq.request.num_sent_blocks = min(seq.request.num_computed_tokens, seq.request.num_prompt_tokens) // bs
