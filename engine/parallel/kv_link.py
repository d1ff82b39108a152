"""A KV link between a prefill worker's ranks and a decode worker's ranks (no torch).

Both workers' ranks join one process group (engine/transfer/gloo.py): prefill ranks first,
then decode ranks. Each side's first rank learns the other side's degree when the link is
opened and tells its other ranks to join (a `LINK` control message carrying this
description); every rank then works out on its own whom it sends to or hears from
(`kv_routes`). Also here: the other control messages a tensor-parallel engine's first rank
sends its other ranks between steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.parallel.shard import kv_heads, kv_routes

# control messages (engine/parallel/group.py Control): values as below
LINK = 2  # KVLink.encode(): join this link
UNLINK = 3  # [link number]: close it (the peer worker is gone or connected again)
EXPECT = 4  # [transfer id, block id...]: a transfer's KV will land in these blocks
FORGET = 5  # [transfer id]: its request ended before the KV landed; drop what comes
REPORT = 6  # []: write what you hold to the store (tests, leak checks)
READ_KV = 7  # [block id...]: write those blocks' KV to the store (tests)
STREAM = 8  # [stream]: semi-PD: join the prefill stream's group and run its steps on a thread of its own

PREFILL, DECODE = 0, 1

Heads = tuple[int, int] | None  # a run of a rank's local KV heads; None: all of them


@dataclass(frozen=True)
class KVLink:
    link_no: int  # the naming side's number for it (a prefill engine's steps say which link a run goes on)
    side: int  # PREFILL or DECODE: whose ranks this description is for
    host: str  # where the decode worker's first rank hosts the group's store
    port: int
    num_kv_heads: int  # the model's
    prefill_size: int
    decode_size: int

    @property
    def size(self) -> int:
        return self.prefill_size + self.decode_size

    def group_rank(self, rank: int) -> int:
        """The group rank of this side's rank `rank`."""
        return rank if self.side == PREFILL else self.prefill_size + rank

    def heads_held(self, rank: int) -> int:
        """How many KV heads this side's rank `rank` holds."""
        return len(kv_heads(self.num_kv_heads, rank, self.prefill_size if self.side == PREFILL else self.decode_size))

    def send_routes(self, rank: int) -> list[tuple[int, Heads]]:
        """Prefill rank `rank`: (group rank, run of its KV heads) of each decode rank it feeds."""
        held = len(kv_heads(self.num_kv_heads, rank, self.prefill_size))
        return [(self.prefill_size + r.dst, _run(r.src_heads, held))
                for r in kv_routes(self.num_kv_heads, self.prefill_size, self.decode_size) if r.src == rank]

    def sources(self, rank: int) -> list[tuple[int, Heads]]:
        """Decode rank `rank`: (group rank, run of its KV heads it fills) of each prefill rank it hears from."""
        held = len(kv_heads(self.num_kv_heads, rank, self.decode_size))
        return [(r.src, _run(r.dst_heads, held))
                for r in kv_routes(self.num_kv_heads, self.prefill_size, self.decode_size) if r.dst == rank]

    def reporters(self, rank: int) -> list[int]:
        """Decode rank `rank`: the group ranks that tell it when they hold a transfer (its first
        rank hears from the others)."""
        return list(range(self.prefill_size + 1, self.size)) if rank == 0 else []

    @property
    def decode_first(self) -> int:
        """The group rank of the decode worker's first rank (whom the others report to)."""
        return self.prefill_size

    def encode(self) -> list[int]:
        return [self.link_no, self.side, self.port, self.num_kv_heads, self.prefill_size, self.decode_size,
                *self.host.encode()]

    @classmethod
    def decode(cls, values: list[int]) -> "KVLink":
        link_no, side, port, heads, prefill_size, decode_size, *host = values
        return cls(link_no, side, bytes(host).decode(), port, heads, prefill_size, decode_size)


def _run(heads: range, held: int) -> Heads:
    return None if (heads.start, heads.stop) == (0, held) else (heads.start, heads.stop)


def encode_runs(runs: list[tuple[int, int, int, bool, list[int]]]) -> list[int]:
    """(link number, transfer id, first block, last, block ids) of each run a prefill step ships."""
    flat: list[int] = []
    for link_no, transfer_id, first, last, block_ids in runs:
        flat += [link_no, transfer_id, first, int(last), len(block_ids), *block_ids]
    return flat


def decode_runs(flat: list[int]) -> list[tuple[int, int, int, bool, list[int]]]:
    runs, i = [], 0
    while i < len(flat):
        link_no, transfer_id, first, last, n = flat[i:i + 5]
        runs.append((link_no, transfer_id, first, bool(last), flat[i + 5:i + 5 + n]))
        i += 5 + n
    return runs
