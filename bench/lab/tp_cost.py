"""What tensor parallelism costs per decode step on this CPU: the same cores running one rank
or two (gloo over loopback), and the time rank 0 spends in the collectives (the step's
broadcast and two all-reduces per layer) within it.

    python -m bench.lab.tp_cost [--batch 1,8,32] [--steps 20] [--threads 2]

The model is a random Llama of SmolLM2-135M's size that two ranks divide (30 layers, hidden
512, 8 heads of 64, 2 KV heads, MLP 1536, vocabulary 49152), built once in a temporary
folder. Prints JSON: ms per step and ms of it in collectives, per batch size and degree.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def build(folder: Path) -> Path:
    import torch
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=49152, hidden_size=512, intermediate_size=1536, num_hidden_layers=30,
                                   num_attention_heads=8, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=2048, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


def measure(model: Path, size: int, batch: int, steps: int, threads: int) -> dict:
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    engine = Engine(EngineConfig(model=str(model), tensor_parallel_size=size, num_threads=threads, max_model_len=512,
                                 num_kv_blocks=128, enable_prefix_caching=False))
    try:
        spent = [0.0]
        tp = engine.runner.tp
        if tp is not None:
            for name in ("all_reduce", "send_step"):
                real = getattr(tp, name)

                def timed(*args, real=real):
                    started = time.perf_counter()
                    real(*args)
                    spent[0] += time.perf_counter() - started
                setattr(tp, name, timed)  # the runner reads tp's methods at every step
        params = SamplingParams(temperature=0, max_tokens=steps + 8, ignore_eos=True)
        for i in range(batch):
            engine.add_request(str(i), [100 + (i * 37 + j) % 40000 for j in range(64)], params)
        for _ in range(4):
            engine.step()  # prefill, warm
        spent[0] = 0.0
        started = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = (time.perf_counter() - started) / steps
        for i in range(batch):
            engine.abort(str(i))
        return {"step_ms": round(wall * 1e3, 2), "collectives_ms": round(spent[0] / steps * 1e3, 2)}
    finally:
        engine.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp) / "llama-tp")
        out = {"threads": args.threads, "ms": {}}
        for batch in (int(b) for b in args.batch.split(",")):
            out["ms"][batch] = {f"tp{size}": measure(model, size, batch, args.steps, args.threads) for size in (1, 2)}
            print(batch, json.dumps(out["ms"][batch]), flush=True)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
