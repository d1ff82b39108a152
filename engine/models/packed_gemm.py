"""oneDNN-packed weights for CPU matmuls.

oneDNN's matmul on a weight reordered once into its own blocked layout (the kernel torch's
inductor uses for frozen linears) ran 1.2-2.3x faster than torch.mm / F.linear (MKL) on our
CPUs at every row count served, 1 (decode) to thousands (prefill), and one packed copy
serves them all (measured in bench/lab/gemm_paths.py). The plain weight stays beside it
(state dicts, the KV predictor). A dtype oneDNN cannot run on this CPU (bfloat16 without
AVX-512 or AVX-NE-CONVERT) is not packed.
"""

from __future__ import annotations

import functools

import torch

PACK_ROWS_HINT = 32  # the row count oneDNN picks the blocked layout for; any count runs on it


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


class PackedWeight:
    def __init__(self, weight_out_in: torch.Tensor):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight_out_in.contiguous(), PACK_ROWS_HINT)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x @ W.T (+ bias)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, bias, "none", [], "")
