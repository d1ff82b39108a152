"""A tensor-parallel rank's KV links (ranks 1..N-1; the first rank's are the worker's own).

On a prefill worker, each step rank 0 broadcasts names the runs of blocks the step writes for
requests whose KV ships (`runs`); after each layer this rank exports its KV heads of those
blocks and sends each decode rank the heads it holds, on its own thread, as rank 0 does.
On a decode worker, this rank receives its heads straight from the prefill ranks holding them
and writes them into the blocks rank 0 reserved: rank 0 says which (`EXPECT`, before it asks
for the prefill) and when a request ended before its KV landed (`FORGET`: what still arrives
is dropped), in the order of its steps, so a block never takes KV of a request that no longer
owns it. A chunk that arrives before its `EXPECT` waits for it. Once this rank holds a whole
transfer it says `DONE` to rank 0, which admits the request only when every rank has.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from engine.parallel.group import Control
from engine.parallel.kv_link import DECODE, EXPECT, FORGET, LINK, PREFILL, READ_KV, REPORT, UNLINK, KVLink, decode_runs
from engine.transfer.base import LayerChunk
from engine.transfer.gloo import DONE, GlooReceiver, GlooSender, join_group

log = logging.getLogger(__name__)

IDLE_LINK_S = 10 * 365 * 86400.0  # a link waits for chunks as long as it lives


@dataclass(eq=False)
class _Link:
    spec: KVLink
    sender: GlooSender  # prefill: the KV it ships; decode: DONE to rank 0 (both wait for the group's join)
    receiver: GlooReceiver | None = None  # decode: once joined


class RankLinks:
    def __init__(self, runner, rank: int, store: dist.Store, timeout_s: float):
        self.runner, self.rank, self.store, self.timeout_s = runner, rank, store, timeout_s
        self.links: dict[int, _Link] = {}
        self.expected: dict[int, list[int]] = {}  # transfer id -> its blocks, in the request's order
        self.staged: dict[int, list[tuple[_Link, LayerChunk]]] = {}  # arrived before their EXPECT
        self.last_expected = 0  # transfer ids grow: one at or below this and not expected ended already
        self.kv_bytes = 0  # received since start
        self._lock = threading.Lock()

    def control(self, msg: Control) -> None:
        values = msg.values
        if msg.kind == LINK:
            self._join(KVLink.decode(values))
        elif msg.kind == UNLINK:
            link = self.links.pop(values[0], None)
            if link is not None:
                link.sender.close()
        elif msg.kind == EXPECT:
            self._expect(values[0], values[1:])
        elif msg.kind == FORGET:
            with self._lock:
                self.expected.pop(values[0], None)
                self.staged.pop(values[0], None)
                for link in list(self.links.values()):
                    if link.receiver is not None:
                        link.receiver.forget(values[0])
        elif msg.kind == REPORT:
            with self._lock:
                held = {"links": len(self.links), "expected": len(self.expected), "staged": len(self.staged),
                        "counting": sum(link.receiver.num_counting for link in self.links.values() if link.receiver),
                        "kv_bytes": self.kv_bytes}
            self.store.set(f"report-{self.rank}", json.dumps(held))
        elif msg.kind == READ_KV:
            cache = self.runner.kv_cache
            kv = torch.stack([cache.export_blocks(i, values) for i in range(len(cache.tensor))]).cpu()
            self.store.set(f"kv-{self.rank}", _to_bytes(kv))
        else:
            raise ValueError(f"unknown control message {msg.kind}")

    def exporter(self, flat_runs: list[int]) -> Callable[[int], None] | None:
        """layer_done for a prefill step shipping `flat_runs` (None: it ships nothing)."""
        runs = decode_runs(flat_runs)
        if not runs:
            return None
        cache, last_layer = self.runner.kv_cache, len(self.runner.kv_cache.tensor) - 1

        def layer_done(layer: int) -> None:
            for link_no, transfer_id, first, last, block_ids in runs:
                link = self.links.get(link_no)
                if link is None:
                    continue  # closed meanwhile: the decode side fails the request on its own
                try:
                    link.sender.send(LayerChunk("", layer, first, cache.export_blocks(layer, block_ids),
                                                last and layer == last_layer, transfer_id=transfer_id))
                except RuntimeError as e:
                    log.warning("rank %d: KV link %d is down, dropping it: %s", self.rank, link_no, e)
                    self.links.pop(link_no, None)

        return layer_done

    def _join(self, spec: KVLink) -> None:
        device = self.runner.device
        joined = join_group(spec.host, spec.port, spec.group_rank(self.rank), spec.size, self.timeout_s, device)
        routes = spec.send_routes(self.rank) if spec.side == PREFILL else []
        link = _Link(spec, GlooSender(joined, device, routes, spec.link_no, self.timeout_s))
        self.links[spec.link_no] = link
        if spec.side == DECODE:
            joined.add_done_callback(lambda f: f.exception() is None and self._receive(link, f.result()))

    def _receive(self, link: _Link, group) -> None:
        """On the joining thread: this rank's heads from the prefill ranks holding them."""
        spec, cfg = link.spec, self.runner.shard.cfg
        shape = (self.runner.block_size, spec.heads_held(self.rank), cfg.head_dim)
        link.receiver = GlooReceiver(group, shape, self.runner.kv_cache.tensor.dtype, IDLE_LINK_S, self.runner.device,
                                     spec.sources(self.rank))
        link.receiver.serve(lambda chunk: self._land(link, chunk), lambda e: self._closed(link, e),
                            f"pdserve-kv-rank{self.rank}")

    def _expect(self, transfer_id: int, block_ids: list[int]) -> None:
        with self._lock:
            self.last_expected = max(self.last_expected, transfer_id)
            self.expected[transfer_id] = block_ids
            for link, chunk in self.staged.pop(transfer_id, []):
                self._write(link, block_ids, chunk)

    def _land(self, link: _Link, chunk: LayerChunk) -> None:
        with self._lock:
            self.kv_bytes += chunk.packed.nbytes
            block_ids = self.expected.get(chunk.transfer_id)
            if block_ids is not None:
                self._write(link, block_ids, chunk)
            elif chunk.transfer_id > self.last_expected:
                self.staged.setdefault(chunk.transfer_id, []).append((link, chunk))
            else:  # of a transfer that ended: it leaves no count behind
                link.receiver.forget(chunk.transfer_id)

    def _write(self, link: _Link, block_ids: list[int], chunk: LayerChunk) -> None:
        """With _lock held."""
        if chunk.layer != DONE and chunk.num_blocks:
            blocks = block_ids[chunk.first_block:chunk.first_block + chunk.num_blocks]
            self.runner.kv_cache.import_blocks(chunk.layer, blocks, chunk.packed, chunk.heads)
        if chunk.last:
            self.expected.pop(chunk.transfer_id, None)
            link.sender.send_done(chunk.transfer_id, link.spec.decode_first)

    def _closed(self, link: _Link, error: Exception) -> None:
        if self.links.get(link.spec.link_no) is link:
            log.warning("rank %d: KV link %d closed: %s", self.rank, link.spec.link_no, error)


def _to_bytes(t: torch.Tensor) -> bytes:
    import io
    buf = io.BytesIO()
    torch.save(t, buf)
    return buf.getvalue()


def from_bytes(data: bytes) -> torch.Tensor:
    import io
    return torch.load(io.BytesIO(data))
