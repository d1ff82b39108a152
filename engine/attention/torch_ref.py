"""Reference attention in plain torch (CPU and any device).

Decode sequences (one new token) are batched by length: sorted longest first and cut into
groups whose padding costs no more than another SDPA call would (`length_groups`), each
group's K/V gathered from the paged cache into one padded batch and attended with one
call. One padded batch of every decode made a step cost its count times the longest
context, not the sum of contexts (twice the sum for typical chat batches). Prefill
sequences run one SDPA each; a prompt with no cached context attends to its own fresh K/V
without a gather.
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
class DecodeGroup:
    tokens: torch.Tensor          # [B] positions of the group's queries in the packed batch
    slots: torch.Tensor           # [B, L] cache slots, padded to the group's longest context
    mask: torch.Tensor | None     # [B, 1, 1, L], None when no row is padded


@dataclass
class TorchMeta:
    slot_mapping: torch.Tensor
    decodes: list[DecodeGroup]
    prefills: list[PrefillSeq]


# Padding a group may carry before a separate SDPA call is cheaper: one call's overhead on
# CPU is about the attention over this many context tokens (bench: 65 us against ~0.7 us/token).
GROUP_PAD_TOKENS = 128


def length_groups(lens: list[int], pad_tokens: int = GROUP_PAD_TOKENS) -> list[list[int]]:
    """Indices into lens, longest first, cut into groups each padded by at most pad_tokens
    in all (every row padded to its group's first, longest, length)."""
    order = sorted(range(len(lens)), key=lambda i: -lens[i])
    groups: list[list[int]] = []
    pad = 0
    for i in order:
        if groups and pad + lens[groups[-1][0]] - lens[i] <= pad_tokens:
            groups[-1].append(i)
            pad += lens[groups[-1][0]] - lens[i]
        else:
            groups.append([i])
            pad = 0
    return groups


class TorchAttention(AttentionBackend):
    name = "torch"

    def prepare(self, layout: BatchLayout, device: torch.device) -> TorchMeta:
        bs = layout.block_size
        decodes = [i for i in range(layout.num_seqs) if layout.q_len(i) == 1]
        groups = length_groups([layout.seq_lens[i] for i in decodes])
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
        return TorchMeta(layout.slot_mapping, [_decode_group(layout, [decodes[j] for j in g], device)
                                               for g in groups], prefills)

    def forward(self, q, k, v, k_cache, v_cache, meta: TorchMeta) -> torch.Tensor:
        write_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        k_flat = k_cache.view(-1, *k_cache.shape[2:])
        v_flat = v_cache.view(-1, *v_cache.shape[2:])
        for g in meta.decodes:
            qd = q.index_select(0, g.tokens).unsqueeze(2)                     # [B, H, 1, D]
            kd = k_flat[g.slots].transpose(1, 2)                              # [B, KVH, L, D]
            vd = v_flat[g.slots].transpose(1, 2)
            od = F.scaled_dot_product_attention(qd, kd, vd, attn_mask=g.mask, enable_gqa=True)
            out.index_copy_(0, g.tokens, od.squeeze(2))
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


def _decode_group(layout: BatchLayout, seqs: list[int], device: torch.device) -> DecodeGroup:
    bs = layout.block_size
    max_len = max(layout.seq_lens[i] for i in seqs)
    pos = torch.arange(max_len)
    table = torch.zeros(len(seqs), -(-max_len // bs), dtype=torch.long)
    for row, i in enumerate(seqs):
        ids = layout.block_ids[i][:-(-layout.seq_lens[i] // bs)]
        table[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    slots = table[:, pos // bs] * bs + pos % bs
    lens = torch.tensor([layout.seq_lens[i] for i in seqs])
    valid = pos[None, :] < lens[:, None]
    return DecodeGroup(torch.tensor([layout.query_start[i] for i in seqs], device=device),
                       slots.masked_fill(~valid, 0).to(device),
                       None if bool(valid.all()) else valid[:, None, None, :].to(device))
