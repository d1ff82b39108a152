"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, and with engine/models/moe.py
Mixtral, Qwen2-MoE, Qwen3-MoE) over a paged KV cache.

The forward is split so a caller can run any contiguous range of layers on part of a
batch and carry (hidden, residual) between steps: `embed` -> `run_layers` -> `final_norm`
-> `compute_logits`. Q/K/V and gate/up projections are fused into single matmuls.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention.base import AttentionBackend
from engine.kv.cache import KVCache
from engine.models import cpu_kernels as kernels
from engine.models import packed_gemm
from engine.models.config import ModelConfig
from engine.models.moe import SparseMoE, WeightReads
from engine.parallel.shard import Shard


@dataclass
class ForwardContext:
    """What every layer of one step needs: built once per step by the runner."""

    positions: torch.Tensor
    cos_sin: torch.Tensor  # the rotary table in the model's dtype (Rotary.cos_sin)
    kv_cache: KVCache
    backend: AttentionBackend
    attn_meta: Any
    reads: WeightReads | None = None  # counts the weight bytes each layer reads
    all_reduce: Callable[[torch.Tensor], None] | None = None  # tensor parallel: sums a tensor over the ranks, in place


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    scaling = cfg.rope_scaling_dict
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen <= old_len / low) & (wavelen >= old_len / high)
        inv_freq = torch.where(is_mid, mid, scaled)
    elif kind == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif kind is not None:
        raise ValueError(f"unsupported rope scaling {kind!r}")
    return inv_freq.float()


class Rotary:
    """Neox-style rotary embedding (HF `rotate_half` convention) from an fp32 cos/sin table."""

    def __init__(self, cfg: ModelConfig, max_len: int, device: torch.device | str = "cpu"):
        freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), rope_inv_freq(cfg))
        emb = torch.cat([freqs, freqs], dim=-1).to(device)
        self.cos, self.sin = emb.cos(), emb.sin()
        self._cos_sin: dict[torch.dtype, torch.Tensor] = {}

    def cos_sin(self, dtype: torch.dtype) -> torch.Tensor:
        """[max_len, head_dim]: cos of the head_dim / 2 frequencies, then their sin (cpu_kernels.rotary)."""
        if dtype not in self._cos_sin:
            half = self.cos.shape[-1] // 2
            self._cos_sin[dtype] = torch.cat([self.cos[:, :half], self.sin[:, :half]], dim=-1).to(dtype)
        return self._cos_sin[dtype]

    def tables(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin rows for a step's positions, shaped to broadcast over heads."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x rotated by full-width cos/sin rows (`tables`: each frequency's value twice)."""
        half = x.shape[-1] // 2
        return kernels.rotate(x, cos[..., :half], sin[..., :half])


class Dense(nn.Module):
    """A linear layer, weight [out, in] as torch's own, run through its oneDNN-packed copy where
    the runner made one (engine/models/packed_gemm.py)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.packed: packed_gemm.Packed | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.matmul(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class DecoderLayer(nn.Module):
    """One decoder layer, or a tensor-parallel rank's shard of it (engine/parallel/shard.py):
    its heads and MLP width, the output and down projections' partial sums all-reduced."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, shard: Shard | None = None):
        super().__init__()
        shard = shard or Shard(cfg)
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = shard.num_heads, shard.num_kv_heads, cfg.head_dim
        q_size, kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.sizes = (q_size, kv_size, kv_size)
        self.qkv_proj = Dense(cfg.hidden_size, q_size + 2 * kv_size, bias=cfg.attention_bias)
        self.o_proj = Dense(q_size, cfg.hidden_size)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.moe = SparseMoE(cfg, Dense, shard) if cfg.is_moe_layer(layer_idx) else None
        if self.moe is None:
            width = len(shard.width(cfg.intermediate_size))
            self.gate_up_proj = Dense(cfg.hidden_size, 2 * width)
            self.down_proj = Dense(width, cfg.hidden_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        expert_params = set(self.moe.experts.parameters()) if self.moe is not None else set()
        self.dense_bytes = sum(p.numel() * p.element_size() for p in self.parameters() if p not in expert_params)

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """May update h in place (fused kernels): the caller hands over the hidden states it passes."""
        n = h.shape[0]
        norm1, norm2 = self.input_layernorm, self.post_attention_layernorm
        q, k, v = self.qkv_proj(kernels.rms_norm(h, norm1.weight, norm1.eps)).split(self.sizes, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = kernels.rotary(ctx.positions, q, k, ctx.cos_sin)
        k_cache, v_cache = ctx.kv_cache.layer(self.layer_idx)
        attn = ctx.backend.forward(q, k, v.contiguous(), k_cache, v_cache, ctx.attn_meta)
        o = self.o_proj(attn.reshape(n, -1))
        if ctx.all_reduce is not None:
            ctx.all_reduce(o)
        x, h = kernels.add_rms_norm(o, h, norm2.weight, norm2.eps)
        if ctx.reads is not None:
            ctx.reads.dense_bytes += self.dense_bytes
        y = self.moe(x, ctx.reads) if self.moe is not None else self.down_proj(kernels.silu_mul(self.gate_up_proj(x)))
        if ctx.all_reduce is not None:
            ctx.all_reduce(y)
        return kernels.add(h, y)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, rotary: Rotary, shard: Shard | None = None):
        super().__init__()
        self.cfg = cfg
        self.shard = shard or Shard(cfg)
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, self.shard) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = rotary
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.logits_packed: packed_gemm.Packed | None = None

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def run_layers(self, h: torch.Tensor, ctx: ForwardContext, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Layers [start, end) over h, which they may update in place."""
        for layer in self.layers[start:end]:
            h = layer(h, ctx)
        return h

    def final_norm(self, h: torch.Tensor) -> torch.Tensor:
        return kernels.rms_norm(h, self.norm.weight, self.norm.eps)

    def compute_logits(self, h: torch.Tensor) -> torch.Tensor:
        if self.logits_packed is not None:
            return self.logits_packed.matmul(h).float()
        return F.linear(h, self._logits_weight()).float()

    def _logits_weight(self) -> torch.Tensor:
        return self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def packable_bytes(self) -> int:
        """Bytes of the weights `pack_weights` makes a copy of."""
        weights = [m.weight for m in self.modules() if isinstance(m, Dense)] + [self._logits_weight()]
        return sum(w.numel() * w.element_size() for w in weights)

    def pack_weights(self, threads: int = 1) -> None:
        """Gives every projection and the logits' weight a oneDNN-packed copy (see packed_gemm),
        one that `threads` threads may run at once; a copy made before is replaced one by one."""
        for module in self.modules():
            if isinstance(module, Dense):
                module.packed = None
                module.packed = packed_gemm.pack(module.weight, threads)
        self.logits_packed = None
        self.logits_packed = packed_gemm.pack(self._logits_weight(), threads)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.final_norm(self.run_layers(self.embed(input_ids), ctx))
