"""What one rank of a tensor-parallel group holds of a model (no torch).

Megatron-style: attention heads and the MLP's intermediate width are split evenly across the
ranks (column-parallel fused QKV and gate/up, row-parallel output and down projections, one
all-reduce after each), KV heads too, or replicated when there are fewer KV heads than
ranks (each rank keeps the one its query heads read); MoE experts go to ranks in turn
(expert e to rank e mod size), a shared expert is split like a dense MLP. Embeddings, norms,
the router and the LM head are replicated. A degree that does not divide the model is
refused with the reason (`check`).
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
        if self.cfg.num_kv_heads >= self.size:
            return self.rank * self.num_kv_heads
        return self.rank * self.cfg.num_kv_heads // self.size

    @property
    def kv_heads(self) -> range:
        return range(self.first_kv_head, self.first_kv_head + self.num_kv_heads)

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
        return [r for r in range(self.size) if head in Shard(self.cfg, r, self.size).kv_heads]
