"""The torch attention backend: length-grouped decodes against one SDPA per sequence."""

import pytest
import torch
import torch.nn.functional as F

from engine.attention.base import BatchLayout, slots_for
from engine.attention.torch_ref import TorchAttention, length_groups


def test_length_groups_bound_padding_and_keep_every_index():
    lens = [700, 120, 240, 260, 300, 350, 450, 180, 250]
    groups = length_groups(lens, pad_tokens=128)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        assert lens[g[0]] == max(lens[i] for i in g)
        assert sum(lens[g[0]] - lens[i] for i in g) <= 128
    assert length_groups([131] * 32) == [list(range(32))]  # equal lengths: one call, no padding
    assert length_groups([]) == []
    assert length_groups([5, 900], pad_tokens=10_000) == [[1, 0]]


@pytest.mark.parametrize("lens", [[37, 5, 260, 300, 129, 17, 64], [50] * 4, [1, 2]])
def test_grouped_decode_attention_equals_per_sequence(lens):
    torch.manual_seed(0)
    bs, heads, kv_heads, dim = 16, 6, 2, 8
    blocks = [-(-n // bs) for n in lens]
    perm = torch.randperm(sum(blocks)).tolist()  # scattered, non-contiguous blocks
    block_ids, at = [], 0
    for n in blocks:
        block_ids.append(perm[at:at + n])
        at += n
    k_cache = torch.randn(sum(blocks), bs, kv_heads, dim)
    v_cache = torch.randn_like(k_cache)
    last = [slots_for(ids, n - 1, n, bs)[0] for ids, n in zip(block_ids, lens)]
    layout = BatchLayout(list(range(len(lens) + 1)), lens, block_ids, torch.tensor(last), bs)
    q = torch.randn(len(lens), heads, dim)
    k, v = torch.randn(len(lens), kv_heads, dim), torch.randn(len(lens), kv_heads, dim)
    backend = TorchAttention()
    out = backend.forward(q, k, v, k_cache, v_cache, backend.prepare(layout, torch.device("cpu")))
    flat_k, flat_v = k_cache.view(-1, kv_heads, dim), v_cache.view(-1, kv_heads, dim)
    for i, (ids, n) in enumerate(zip(block_ids, lens)):
        s = torch.tensor(slots_for(ids, 0, n, bs))
        ref = F.scaled_dot_product_attention(q[i][None, :, None], flat_k[s].transpose(0, 1)[None],
                                             flat_v[s].transpose(0, 1)[None], enable_gqa=True)
        torch.testing.assert_close(out[i], ref[0, :, 0], atol=1e-5, rtol=1e-5)
