"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE, Qwen3-MoE).

A router (`gate`, [hidden, experts]) scores each token; the softmax's top-k experts run on
it, weighted by their probabilities (renormalised to sum to one for Mixtral, and for Qwen
when `norm_topk_prob`). Each expert is a SwiGLU MLP with gate/up fused. Qwen2-MoE adds a
shared expert on every token, scaled by sigmoid(shared_expert_gate(x)).

Experts run one at a time on the tokens routed to them (gather, MLP, weighted scatter-add),
so an expert no token chose costs nothing this step, and its weights are not read. A
tensor-parallel rank holds only its shard's experts (whole) and its part of the shared
expert's width; its output is a partial sum that the layer all-reduces.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.config import ModelConfig
from engine.parallel.shard import Shard


class Expert(nn.Module):
    def __init__(self, hidden: int, intermediate: int, dense: type[nn.Module]):
        super().__init__()
        self.gate_up_proj = dense(hidden, 2 * intermediate)
        self.down_proj = dense(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dense: type[nn.Module], shard: Shard | None = None):
        super().__init__()
        shard = shard or Shard(cfg)
        self.num_experts, self.top_k, self.normalize = cfg.num_experts, cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = dense(cfg.hidden_size, cfg.num_experts)
        self.experts = nn.ModuleDict({str(e): Expert(cfg.hidden_size, cfg.moe_intermediate_size, dense)
                                      for e in shard.experts})  # keyed by the model's expert number
        shared = len(shard.width(cfg.shared_expert_intermediate_size))
        self.shared_expert = Expert(cfg.hidden_size, shared, dense) if shared else None
        self.shared_expert_gate = dense(cfg.hidden_size, 1) if shared else None
        self.expert_bytes = sum(p.numel() * p.element_size() for p in next(iter(self.experts.values())).parameters()) \
            if len(self.experts) else 0

    def forward(self, x: torch.Tensor, reads: WeightReads | None = None) -> torch.Tensor:
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, chosen = probs.topk(self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        flat = chosen.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        start, ran = 0, 0
        for e, count in enumerate(counts):
            picks = order[start:start + count]
            start += count
            expert = self.experts[str(e)] if count and str(e) in self.experts else None
            if expert is None:
                continue
            ran += 1
            tokens = picks // self.top_k
            y = expert(x.index_select(0, tokens)) * weights.flatten()[picks, None]
            out.index_add_(0, tokens, y)
        if reads is not None:
            reads.experts += ran
            reads.expert_bytes += self.expert_bytes * ran
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class WeightReads:
    """Weight bytes a forward read: every dense weight of each layer it ran (attention, router,
    dense or shared MLP, norms) once, and each expert that got at least one token once."""

    def __init__(self) -> None:
        self.dense_bytes = 0
        self.expert_bytes = 0
        self.experts = 0  # (layer, expert) pairs run
