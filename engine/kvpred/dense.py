"""A differentiable forward of the engine's own model over one sequence, for KV prediction.

The engine's layers run unchanged; only the two things they are handed differ: `DenseKV`
stands in for the paged KV cache and gives each layer a prefix of K/V (already rotated) to
attend to before the sequence's own tokens, and `DenseAttention` attends densely (causal,
GQA), keeps the graph (so a loss reaches predicted prefix K/V) and records each layer's
keys before rotary embedding and values.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, BatchLayout
from engine.models.llama import ForwardContext, LlamaModel, Rotary

KV = tuple[torch.Tensor, torch.Tensor]  # keys, values: [tokens, kv_heads, head_dim]


class DenseKV:
    """The prefix each layer attends to first: layer i -> (keys after rotary, values)."""

    def __init__(self, layers: list[KV] | None = None):
        self.layers = layers

    def layer(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        return self.layers[i] if self.layers else (None, None)


class DenseAttention(AttentionBackend):
    name = "dense"

    def __init__(self) -> None:
        self.captured: list[KV] = []  # per layer run: (keys before rotary, values) of the new tokens

    def prepare(self, layout: BatchLayout, device: torch.device) -> Any:
        raise NotImplementedError("DenseAttention is driven by forward_dense")

    def forward(self, q, k, v, k_cache, v_cache, meta):
        cos, sin = meta
        self.captured.append((Rotary.apply(k, cos, -sin), v))  # undo the rotation: the key before rotary
        mask = None  # no prefix: plain causal attention, SDPA's fused kernel (no mask materialised)
        if k_cache is not None:
            k, v = torch.cat([k_cache, k]), torch.cat([v_cache, v])
            t, total = q.shape[0], k.shape[0]
            mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(total - t)
        groups = q.shape[1] // k.shape[1]  # GQA: kv heads repeated (enable_gqa would take SDPA's slow math path)
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        q, k, v = (x.transpose(0, 1).unsqueeze(0) for x in (q, k, v))  # 4-D: what the fused kernels take
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        return out[0].transpose(0, 1)


def forward_dense(model: LlamaModel, input_ids: torch.Tensor, start: int = 0, prefix: list[KV] | None = None,
                  dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[KV]]:
    """Runs tokens at positions [start, start + len) after a prefix of `start` tokens whose
    per-layer K/V (keys rotated) are given. Returns the final hidden states (after the norm)
    and each layer's (keys before rotary, values) of these tokens."""
    positions = torch.arange(start, start + input_ids.shape[0], device=input_ids.device)
    cos, sin = model.rotary.tables(positions, dtype)
    backend = DenseAttention()
    ctx = ForwardContext(positions, model.rotary.cos_sin(dtype), DenseKV(prefix), backend,  # type: ignore[arg-type]
                         (cos, sin))
    hidden = model.final_norm(model.run_layers(model.embed(input_ids), ctx))
    return hidden, backend.captured


def rotate(keys: torch.Tensor, model: LlamaModel, start: int = 0) -> torch.Tensor:
    """Keys before rotary at positions [start, start + len), rotated as `model` does."""
    positions = torch.arange(start, start + keys.shape[0], device=keys.device)
    cos, sin = model.rotary.tables(positions, keys.dtype)
    return Rotary.apply(keys, cos, sin)
