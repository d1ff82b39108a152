"""Reference attention in plain torch (CPU and any device).

Decode sequences (one new token) are batched: their K/V are gathered from the paged cache
into one padded batch and attended with one SDPA call. Prefill sequences run one SDPA
each; a prompt with no cached context attends to its own fresh K/V without a gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.attention.base import AttentionBackend, BatchLayout, slots_for, write_kv


@dataclass
class PrefillSeq:
    token_start: int
    q_len: int
    slots: torch.Tensor | None
    mask: torch.Tensor | None


@dataclass
class TorchMeta:
    slot_mapping: torch.Tensor
    decode_tokens: torch.Tensor | None
    decode_slots: torch.Tensor | None
    decode_mask: torch.Tensor | None
    prefills: list[PrefillSeq]


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, layout: BatchLayout, device: torch.device) -> TorchMeta:
        bs = layout.block_size
        decodes = [i for i in range(layout.num_seqs) if layout.q_len(i) == 1]
        decode_tokens = decode_slots = decode_mask = None
        if decodes:
            max_len = max(layout.seq_lens[i] for i in decodes)
            pos = torch.arange(max_len)
            table = torch.zeros(len(decodes), -(-max_len // bs), dtype=torch.long)
            for row, i in enumerate(decodes):
                ids = layout.block_ids[i][:-(-layout.seq_lens[i] // bs)]
                table[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            slots = table[:, pos // bs] * bs + pos % bs
            lens = torch.tensor([layout.seq_lens[i] for i in decodes])
            valid = pos[None, :] < lens[:, None]
            decode_slots = slots.masked_fill(~valid, 0).to(device)
            decode_mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
            decode_tokens = torch.tensor([layout.query_start[i] for i in decodes], device=device)
        prefills = []
        for i in range(layout.num_seqs):
            q_len, seq_len = layout.q_len(i), layout.seq_lens[i]
            if q_len == 1:
                continue
            slots = mask = None
            if seq_len > q_len:
                slots = torch.tensor(slots_for(layout.block_ids[i], 0, seq_len, bs), device=device)
                offset = seq_len - q_len
                mask = (torch.arange(seq_len, device=device)[None, :]
                        <= torch.arange(q_len, device=device)[:, None] + offset)
            prefills.append(PrefillSeq(layout.query_start[i], q_len, slots, mask))
        return TorchMeta(layout.slot_mapping, decode_tokens, decode_slots, decode_mask, prefills)

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchMeta) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        if meta.decode_tokens is not None:
            qd = q.index_select(0, meta.decode_tokens).unsqueeze(2)          # [B, H, 1, D]
            kd = k_flat[meta.decode_slots].transpose(1, 2)                    # [B, KVH, L, D]
            vd = v_flat[meta.decode_slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=meta.decode_mask, enable_gqa=True)
            out.index_copy_(0, meta.decode_tokens, od.squeeze(2))
        for p in meta.prefills:
            # 4-D inputs: with 3-D ones SDPA's GQA path falls back to the slow math kernel on CPU
            sl = slice(p.token_start, p.token_start + p.q_len)
            qp = q[sl].transpose(0, 1).unsqueeze(0)                           # [1, H, Lq, D]
            if p.slots is None:
                kp, vp = k[sl].transpose(0, 1).unsqueeze(0), v[sl].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=True)
            else:
                kp, vp = k_flat[p.slots].transpose(0, 1).unsqueeze(0), v_flat[p.slots].transpose(0, 1).unsqueeze(0)
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=p.mask, enable_gqa=True)
            out[sl] = op[0].transpose(0, 1)
        return out
