"""A tensor-parallel group: its collectives, and the step plan rank 0 hands the others.

The group is a ProcessGroupGloo (CPU) or ProcessGroupNCCL (CUDA) over a TCPStore that rank 0
hosts on a socket it listens on itself, independent of any global process group. Rank 0
plans every step; before its forward it broadcasts the step's flat inputs (token ids,
positions, KV slots, per-sequence query starts, lengths and block tables) to the other ranks,
which run the same forward on their shard with no round trip through Python RPC; a prefill
engine's step also names the KV each rank ships as layers finish (its `runs`). Between steps
rank 0 sends control messages the same way (`Control`: KV links to join, transfers to expect
or forget). A peer that dies closes its sockets, so a collective waiting on it fails at once
(`GroupError`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from engine.attention.base import BatchLayout

HEADER_LEN = 6  # kind, tokens, sequences, block-table width, runs, prefill share (a control message: kind, body length)
STEP, STOP = 1, 0
_TAG = 11
IDLE_TIMEOUT_S = 365 * 24 * 3600.0  # the others wait for rank 0's next step as long as it takes


class GroupError(RuntimeError):
    """A collective failed: a rank died or the group was closed."""


@dataclass
class Step:
    input_ids: torch.Tensor
    positions: torch.Tensor
    layout: BatchLayout
    runs: list[int]  # KV to ship per layer, flat (engine/parallel/links.py reads it)
    prefill_share: float  # semi-PD: the prefill stream's share of each rank's cores (0: no split)


@dataclass
class Control:
    kind: int  # engine/parallel/kv_link.py names them; any but STEP and STOP
    values: list[int]


class TPGroup:
    def __init__(self, group: dist.ProcessGroup, rank: int, size: int, device: torch.device):
        self.group, self.rank, self.size, self.device = group, rank, size, device
        self.broken: Exception | None = None

    def all_reduce(self, t: torch.Tensor) -> None:
        """Sums t over the ranks, in place. On CPU each rank sends its part to every other and
        adds the parts up in rank order (the same sum, bit for bit, on every rank): one round
        trip, ~0.13 ms for a decode step's hidden states on loopback against ~0.4-1.7 ms through
        gloo's allreduce (bench/lab/tp_cost.py)."""
        if self.device.type != "cpu":
            self._wait(self.group.allreduce([t]))
            return
        peers = [r for r in range(self.size) if r != self.rank]
        parts = {r: torch.empty_like(t) for r in peers}
        works = [self.group.send([t], r, _TAG) for r in peers] + [self.group.recv([parts[r]], r, _TAG) for r in peers]
        for work in works:
            self._wait(work)
        parts[self.rank] = t
        total = parts[0].clone()
        for r in range(1, self.size):
            total += parts[r]
        t.copy_(total)

    def _broadcast(self, t: torch.Tensor) -> None:
        self._wait(self.group.broadcast([t], dist.BroadcastOptions()))

    def _wait(self, work) -> None:
        if self.broken is not None:
            raise GroupError(f"the tensor-parallel group is down: {self.broken}")
        try:
            work.wait()
        except RuntimeError as e:
            self.broken = e
            raise GroupError(f"a tensor-parallel rank is gone: {e}") from e

    def send_step(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout,
                  runs: list[int] = (), prefill_share: float = 0.0) -> None:
        """Rank 0: the step's inputs to every other rank."""
        width = max(len(ids) for ids in layout.block_ids)
        table = [b for ids in layout.block_ids for b in ids + [0] * (width - len(ids))]
        header = torch.tensor([STEP, input_ids.numel(), len(layout.seq_lens), width, len(runs),
                               round(prefill_share * 100)], dtype=torch.int64)
        body = torch.cat([input_ids.cpu(), positions.cpu(), layout.slot_mapping.cpu(),
                          torch.tensor(layout.query_start + layout.seq_lens + table + list(runs), dtype=torch.int64)])
        self._broadcast(header.to(self.device))
        self._broadcast(body.to(self.device))

    def send_control(self, kind: int, values: list[int]) -> None:
        """Rank 0: a control message to every other rank, between steps."""
        assert kind not in (STEP, STOP)
        self._broadcast(torch.tensor([kind, len(values), 0, 0, 0, 0], dtype=torch.int64, device=self.device))
        if values:
            self._broadcast(torch.tensor(values, dtype=torch.int64, device=self.device))

    def send_stop(self) -> None:
        self._broadcast(torch.tensor([STOP, 0, 0, 0, 0, 0], dtype=torch.int64, device=self.device))

    def recv_step(self, block_size: int) -> Step | Control | None:
        """The other ranks: the next step's inputs or control message, or None when rank 0
        stops the group."""
        header = torch.empty(HEADER_LEN, dtype=torch.int64, device=self.device)
        self._broadcast(header)
        kind, tokens, seqs, width, num_runs, share = header.tolist()
        if kind == STOP:
            return None
        if kind != STEP:
            values = torch.empty(tokens, dtype=torch.int64, device=self.device)
            if tokens:
                self._broadcast(values)
            return Control(kind, values.tolist())
        body = torch.empty(3 * tokens + 2 * seqs + 1 + seqs * width + num_runs, dtype=torch.int64, device=self.device)
        self._broadcast(body)
        ids, positions, slots, rest = body.split([tokens, tokens, tokens, 2 * seqs + 1 + seqs * width + num_runs])
        rest = rest.tolist()
        query_start, seq_lens = rest[:seqs + 1], rest[seqs + 1:2 * seqs + 1]
        table, runs = rest[2 * seqs + 1:2 * seqs + 1 + seqs * width], rest[2 * seqs + 1 + seqs * width:]
        block_ids = [table[i * width:i * width + -(-seq_lens[i] // block_size)] for i in range(seqs)]
        return Step(ids, positions, BatchLayout(query_start, seq_lens, block_ids, slots, block_size), runs, share / 100)

    def close(self) -> None:
        self.broken = self.broken or GroupError("closed")


def connect(host: str, rank: int, size: int, device: torch.device, store: dist.Store, stream: int = 0) -> TPGroup:
    """Blocks until every rank has joined, over a store rank 0 hosts (engine/parallel/ranks.py).
    stream: semi-PD runs a group per stream (0: decode, or the only one; 1: prefill)."""
    store = dist.PrefixStore(f"pdserve-tp-{stream}", store)
    idle = timedelta(seconds=IDLE_TIMEOUT_S)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = idle
        group = dist.ProcessGroupNCCL(store, rank, size, options)
    else:
        options = dist.ProcessGroupGloo._Options()
        options._devices = [dist.ProcessGroupGloo.create_device(hostname=host)]
        options._timeout = idle
        group = dist.ProcessGroupGloo(store, rank, size, options)
    tp = TPGroup(group, rank, size, device)
    tp.all_reduce(torch.zeros(1, device=device))  # every rank is in: the first collective sets up the links
    return tp
