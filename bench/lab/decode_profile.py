"""Where a decode step of pdserve's engine spends its time: the torch profiler over steady decode
steps at one batch size, each op's own time put in a class (matmuls, attention, element-wise,
copies and indexing, sampling), and what no op accounts for (Python and dispatch) as wall time
minus the ops' own time.

    python -m bench.lab.decode_profile [--batch 8] [--context 64] [--steps 20] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import os
import time

CLASSES = {  # the op names' classes, first match wins
    "matmul": ("mkl", "mm", "addmm", "linear", "matmul", "bmm"),
    "attention": ("scaled_dot_product", "flash_attention", "softmax", "cpu_attention", "cpu_attn", "scheduler_metadata"),
    "sampling": ("argmax", "topk", "sort", "multinomial", "log_softmax", "cumsum"),
    "copy/index": ("index", "copy", "cat", "to_copy", "pad", "gather", "scatter", "clone", "contiguous", "fill"),
    "element-wise": ("rms_norm", "silu", "mul", "add", "sub", "div", "pow", "rsqrt", "mean", "sum", "neg", "exp",
                     "where", "masked_fill", "sigmoid"),
}


def op_class(name: str) -> str:
    op = name.removeprefix("aten::").removeprefix("mkl::").removeprefix("_C::").lower()
    for cls, keys in CLASSES.items():
        if any(op == k or op.startswith(k + "_") or op.startswith("_" + k) or k in op for k in keys):
            return cls
    return "other ops"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=64, help="prompt tokens per request before the timed steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--dtype", default="float32")
    args = ap.parse_args(argv)
    from torch.profiler import ProfilerActivity, profile

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    engine = Engine(EngineConfig(dtype=args.dtype, num_threads=args.threads, max_model_len=2048,
                                 enable_prefix_caching=False))
    params = SamplingParams(temperature=0, max_tokens=2 * args.steps + 8, ignore_eos=True)
    for i in range(args.batch):
        engine.add_request(str(i), [100 + (i * 37 + j) % 40000 for j in range(args.context)], params)
    while not all(r.num_output_tokens for rs in engine.requests.values() for r in rs):
        engine.step()  # prefills
    for _ in range(4):
        engine.step()  # warm
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(args.steps):
            engine.step()
        wall_us = (time.perf_counter() - started) * 1e6
    per_class: dict[str, float] = {}
    for event in prof.key_averages():
        if event.self_cpu_time_total > 0:
            cls = op_class(event.key)
            per_class[cls] = per_class.get(cls, 0.0) + event.self_cpu_time_total
    ops_us = sum(per_class.values())
    per_class["python and dispatch (wall - ops)"] = max(0.0, wall_us - ops_us)
    step_ms = {cls: round(us / args.steps / 1000, 3) for cls, us in sorted(per_class.items(), key=lambda kv: -kv[1])}
    print(json.dumps({"batch": args.batch, "context": args.context, "threads": args.threads, "dtype": args.dtype,
                      "step_ms": round(wall_us / args.steps / 1000, 3), "per_step_ms": step_ms,
                      "share": {cls: f"{100 * ms / (wall_us / args.steps / 1000):.0f} %" for cls, ms in step_ms.items()}},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
