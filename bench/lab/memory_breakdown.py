"""Where an engine's resident memory goes: torch, weights, the packed weights, KV cache.

    python bench/lab/memory_breakdown.py                       # the default model, defaults
    python bench/lab/memory_breakdown.py --cpu-weight-packing off  # without the packed copy

Builds the engine step by step in this process and prints its RSS after each, then after
64 prompts of 890 tokens (every KV block written at least once with the default 1 GiB).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.memory import process_rss  # noqa: E402


def mb(n: int) -> int:
    return n >> 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--cpu-weight-packing", default="auto")
    parser.add_argument("--kv-cache-memory", default="auto")
    args = parser.parse_args(argv)
    print(f"python                  {mb(process_rss()):6d} MB")
    import torch  # noqa: F401
    print(f"torch imported          {mb(process_rss()):6d} MB")
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    engine = Engine(EngineConfig(model=args.model, cpu_weight_packing=args.cpu_weight_packing,
                                 kv_cache_memory=args.kv_cache_memory))
    runner = engine.runner
    weights = sum(t.numel() * t.element_size() for t in runner.model.state_dict().values())
    print(f"engine built            {mb(process_rss()):6d} MB  (weights {mb(weights)} MB, packed copy "
          f"{'of ' + str(mb(runner.model.packable_bytes())) + ' MB' if runner.memory.packed_weights else 'none'}, "
          f"KV {mb(runner.kv_cache.tensor.numel() * runner.kv_cache.tensor.element_size())} MB reserved)")
    for i in range(64):
        engine.add_request(str(i), list(range(10 + i, 900 + i)), SamplingParams(max_tokens=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    print(f"after 64 x 890 tokens   {mb(process_rss()):6d} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
