"""flash-attn with paged KV (GPU only; used when `flash_attn` is importable).

One `flash_attn_varlen_func` call per layer covers prefill and decode sequences alike:
queries packed by `cu_seqlens_q`, keys read through the block table. flash-attn 2 needs
a page size that is a multiple of 256 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend, BatchLayout, write_kv


def available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@dataclass
class FlashMeta:
    slot_mapping: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    block_table: torch.Tensor


class FlashAttention(AttentionBackend):
    name = "flash"

    def __init__(self, block_size: int):
        if block_size % 256:
            raise ValueError("the flash attention backend needs --block-size a multiple of 256")
        from flash_attn import flash_attn_varlen_func
        self._varlen = flash_attn_varlen_func

    def prepare(self, layout: BatchLayout, device: torch.device) -> FlashMeta:
        max_blocks = max(len(b) for b in layout.block_ids)
        table = torch.zeros(layout.num_seqs, max_blocks, dtype=torch.int32)
        for i, ids in enumerate(layout.block_ids):
            table[i, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        cu_k = [0]
        for n in layout.seq_lens:
            cu_k.append(cu_k[-1] + n)
        q_lens = [layout.q_len(i) for i in range(layout.num_seqs)]
        return FlashMeta(layout.slot_mapping,
                         torch.tensor(layout.query_start, dtype=torch.int32, device=device),
                         torch.tensor(cu_k, dtype=torch.int32, device=device),
                         max(q_lens), max(layout.seq_lens), table.to(device))

    def forward(self, q, k, v, k_cache, v_cache, meta: FlashMeta) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return self._varlen(q, k_cache, v_cache, cu_seqlens_q=meta.cu_seqlens_q,
                            cu_seqlens_k=meta.cu_seqlens_k, max_seqlen_q=meta.max_seqlen_q,
                            max_seqlen_k=meta.max_seqlen_k, causal=True, block_table=meta.block_table)
