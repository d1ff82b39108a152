"""What one rank of a tensor-parallel group holds of a model (no torch).

Megatron-style: attention heads and the MLP's intermediate width are split evenly across the
ranks (column-parallel fused QKV and gate/up, row-parallel output and down projections, one
all-reduce after each), KV heads too, or replicated when there are fewer KV heads than
ranks (each rank keeps the one its query heads read); MoE experts go to ranks in turn
(expert e to rank e mod size), a shared expert is split like a dense MLP. Embeddings, norms,
the router and the LM head are replicated. A degree that does not divide the model is
refused with the reason (`check`).

Between a prefill worker of A ranks and a decode worker of B ranks, `kv_routes` says which
prefill rank sends which of its KV heads to which decode rank: each decode rank gets exactly
the heads it holds, each from one prefill rank holding it (spread over the holders when
heads are replicated).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.models.config import ModelConfig


def check(cfg: ModelConfig, size: int) -> None:
    """Raises ValueError when `size` ranks cannot split this model."""
    if size < 1:
        raise ValueError(f"--tensor-parallel-size must be at least 1, not {size}")
    if size == 1:
        return
    problems = []
    if cfg.num_heads % size:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % size and size % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (a degree must divide them or be a multiple of them)")
    if any(not cfg.is_moe_layer(i) for i in range(cfg.num_layers)) and cfg.intermediate_size % size:
        problems.append(f"an MLP width of {cfg.intermediate_size}")
    if cfg.shared_expert_intermediate_size % size:
        problems.append(f"a shared expert width of {cfg.shared_expert_intermediate_size}")
    if problems:
        raise ValueError(f"tensor-parallel size {size} does not divide this {cfg.architecture} model: " + ", ".join(problems))


@dataclass(frozen=True)
class Shard:
    """Rank `rank` of `size`: the ranges of the model's heads and widths it holds."""

    cfg: ModelConfig
    rank: int = 0
    size: int = 1

    @property
    def num_heads(self) -> int:
        return self.cfg.num_heads // self.size

    @property
    def num_kv_heads(self) -> int:
        return max(1, self.cfg.num_kv_heads // self.size)

    @property
    def first_head(self) -> int:
        return self.rank * self.num_heads

    @property
    def first_kv_head(self) -> int:
        """The first KV head this rank holds (with replication: the one its query heads read)."""
        return self.kv_heads.start

    @property
    def kv_heads(self) -> range:
        return kv_heads(self.cfg.num_kv_heads, self.rank, self.size)

    def width(self, full: int) -> range:
        """This rank's part of an MLP's intermediate width `full`."""
        part = full // self.size
        return range(self.rank * part, (self.rank + 1) * part)

    def holds_expert(self, expert: int) -> bool:
        return expert % self.size == self.rank

    @property
    def experts(self) -> list[int]:
        return [e for e in range(self.cfg.num_experts) if self.holds_expert(e)]

    def ranks_holding_kv_head(self, head: int) -> list[int]:
        """Every rank that holds KV head `head` (more than one when replicated)."""
        return [r for r in range(self.size) if head in kv_heads(self.cfg.num_kv_heads, r, self.size)]


def kv_heads(num_kv_heads: int, rank: int, size: int) -> range:
    """The KV heads rank `rank` of `size` holds: its share, or with fewer heads than ranks the
    one its query heads read."""
    if num_kv_heads >= size:
        part = num_kv_heads // size
        return range(rank * part, (rank + 1) * part)
    first = rank * num_kv_heads // size
    return range(first, first + 1)


@dataclass(frozen=True)
class Route:
    """KV heads one prefill rank sends to one decode rank, as local head indices on each."""

    src: int
    dst: int
    src_heads: range
    dst_heads: range


def kv_routes(num_kv_heads: int, src_size: int, dst_size: int) -> list[Route]:
    """How KV moves from a prefill worker of src_size ranks to a decode worker of dst_size
    ranks: for each decode rank, runs of its heads, each run from one prefill rank that holds
    it (decode rank d takes a replicated head from holder d mod the number of holders)."""
    for size in (src_size, dst_size):
        if size < 1 or (num_kv_heads % size and size % num_kv_heads):
            raise ValueError(f"{size} ranks cannot split {num_kv_heads} KV heads: a degree must divide them "
                             "or be a multiple of them")
    routes: list[Route] = []
    for dst in range(dst_size):
        for k, head in enumerate(kv_heads(num_kv_heads, dst, dst_size)):
            holders = [r for r in range(src_size) if head in kv_heads(num_kv_heads, r, src_size)]
            src = holders[dst % len(holders)]
            local = head - kv_heads(num_kv_heads, src, src_size).start
            last = routes[-1] if routes else None
            if last and (last.src, last.dst, last.src_heads.stop, last.dst_heads.stop) == (src, dst, local, k):
                routes[-1] = Route(src, dst, range(last.src_heads.start, local + 1), range(last.dst_heads.start, k + 1))
            else:
                routes.append(Route(src, dst, range(local, local + 1), range(k, k + 1)))
    return routes
