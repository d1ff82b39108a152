"""Predicted prefill: a trained KV predictor fills a prompt's KV cache in an engine.

For a prompt of n tokens the auxiliary model reads the first n - 1; the predictor's K/V for
them (keys rotated by the base at their positions) are packed into `LayerChunk`s, one per
base layer, and written through the engine's KV import path (`Engine.receive_kv`), as a
transfer from a prefill worker would be. The base model then computes the prompt's last
token over that cache and samples the first token as usual, so predicted prefill costs the
auxiliary model's forward plus one base token (`predicted_flops`).

A cached prefix of the prompt (exact KV) is used as it is; only the rest is predicted.
Predicted KV is approximate: its blocks never enter the prefix cache, and neither do the
blocks of tokens computed over it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from engine.kvpred.dense import rotate
from engine.kvpred.predictor import KVPredictor
from engine.models.config import ModelConfig
from engine.models.llama import LlamaModel
from engine.transfer.base import LayerChunk


def forward_flops(cfg: ModelConfig, num_tokens: int, start: int = 0, logits: int = 1) -> float:
    """Matmul FLOPs of a forward over num_tokens after start cached ones: projections and MLP
    (MoE: the routed experts only), attention over each token's context, and the head for
    `logits` tokens."""
    q, kv, h = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size
    total = 0.0
    for layer in range(cfg.num_layers):
        if cfg.is_moe_layer(layer):
            mlp = 3 * h * (cfg.moe_intermediate_size * cfg.num_experts_per_tok + cfg.shared_expert_intermediate_size)
        else:
            mlp = 3 * h * cfg.intermediate_size
        total += 2 * num_tokens * (h * (q + 2 * kv) + q * h + mlp)
    context = num_tokens * start + num_tokens * (num_tokens + 1) / 2  # keys each new token attends to
    total += cfg.num_layers * 4 * q * context
    return total + 2 * h * cfg.vocab_size * logits


def predicted_flops(base: ModelConfig, aux: ModelConfig, num_prompt_tokens: int) -> float:
    """Predicted prefill: the auxiliary model over n - 1 tokens (no head), the K/V maps, and
    the base over the last token."""
    n = num_prompt_tokens - 1
    maps = 2 * 2 * n * (aux.num_kv_heads * aux.head_dim) * (base.num_kv_heads * base.head_dim) * base.num_layers
    return forward_flops(aux, n, logits=0) + maps + forward_flops(base, 1, start=n)


class PredictedPrefill:
    """A KV predictor loaded beside an engine's base model (same device and dtype)."""

    def __init__(self, folder: str | Path, base: LlamaModel, max_len: int, device: torch.device,
                 dtype: torch.dtype):
        self.folder = Path(folder)
        predictor, meta = KVPredictor.load(self.folder, base.cfg, device, max_len)
        self.predictor = predictor.to(dtype).eval().requires_grad_(False)
        self.base, self.step = base, int(meta.get("step", 0))
        # predicted prefill's FLOPs as a share of the base's, for a 1024-token prompt (what routing weighs it by)
        self.cost = predicted_flops(base.cfg, self.predictor.aux.cfg, 1024) / forward_flops(base.cfg, 1024)

    @torch.inference_mode()
    def chunks(self, request_id: str, prompt_token_ids: list[int], block_size: int, first_block: int = 0
               ) -> Iterator[LayerChunk]:
        """Per base layer, the predicted K/V of the prompt's first n - 1 tokens from block
        `first_block` on (those before it are cached), packed as a transfer chunk over the
        request's blocks (zero past the last token). The auxiliary model reads all n - 1."""
        ids = torch.tensor(prompt_token_ids[:-1], device=self.base.embed_tokens.weight.device)
        start, n = first_block * block_size, ids.shape[0]
        num_blocks = -(-n // block_size) - first_block
        predicted, _ = self.predictor.predict(ids)
        last = len(predicted) - 1
        for layer, (k, v) in enumerate(predicted):
            packed = k.new_zeros(2, num_blocks * block_size, *k.shape[1:])
            packed[0, :n - start], packed[1, :n - start] = rotate(k[start:], self.base, start), v[start:]
            yield LayerChunk(request_id, layer, first_block, packed.view(2, num_blocks, block_size, *k.shape[1:]),
                             last=layer == last)
