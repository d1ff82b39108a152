"""MKL-packed fp32 GEMM for small CPU batches (decode).

MKL's packed SGEMM (the kernel torch's inductor uses for frozen fp32 linears) ran 1.5-2x
faster than plain SGEMM on our CPU for 8-32 rows, but only when the row count equals the
one the weight was packed for; any other count falls back to the slow path. So a weight
keeps one packed copy per bucket, inputs are zero-padded up to the smallest bucket that
holds them, and 1 row (a GEMV, already bandwidth-bound) or more rows than the largest
bucket (prefill) use plain mm. Costs one extra copy of the weights per bucket.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32 and torch._C.has_mkl


class PackedWeight:
    def __init__(self, weight_out_in: torch.Tensor, buckets: tuple[int, ...]):
        self.origin = weight_out_in
        self.buckets = tuple(sorted(buckets))
        contiguous = weight_out_in.contiguous()
        self.packs = {m: torch.ops.mkl._mkl_reorder_linear_weight(contiguous, m) for m in self.buckets}

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor | None:
        """x @ W.T (+ bias) through a packed copy, or None when no bucket suits x's rows."""
        rows = x.shape[0]
        if rows < 2 or rows > self.buckets[-1]:
            return None
        bucket = next(b for b in self.buckets if b >= rows)
        padded = x if bucket == rows else F.pad(x, (0, 0, 0, bucket - rows))
        out = torch.ops.mkl._mkl_linear(padded, self.packs[bucket], self.origin, bias, bucket)
        return out if bucket == rows else out[:rows]
