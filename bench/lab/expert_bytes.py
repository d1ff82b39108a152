"""Expert weight bytes read by layered against chunked prefill on one long prompt (issue #7).

    python -m bench.lab.expert_bytes [--prompt-tokens 4096] [--token-budget 512] [--json OUT]

Builds a random Qwen3-MoE-shaped model offline (8 layers, 64 experts, top 8, as Qwen3-30B-A3B
routes, at small widths so it runs on a CPU), prefills one prompt under each schedule
through the engine, and prints the weight bytes the steps read (the engine's
`weight_bytes_dense` / `weight_bytes_expert` stats).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path


def build(out: Path) -> Path:
    import torch
    import transformers
    cfg = transformers.Qwen3MoeConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                      num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4, head_dim=32,
                                      num_experts=64, num_experts_per_tok=8, norm_topk_prob=True,
                                      max_position_embeddings=16384, tie_word_embeddings=False, eos_token_id=2)
    torch.manual_seed(0)
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.expert_bytes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=4096)
    parser.add_argument("--token-budget", type=int, default=512)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp))
        prompt = torch.randint(3, 4096, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
        for schedule in ("chunked", "layered"):
            engine = Engine(EngineConfig(model=str(model), prefill_schedule=schedule, token_budget=args.token_budget,
                                         max_num_batched_tokens=8192, cpu_weight_packing="off", kv_cache_memory="256MiB"))
            engine.add_request("long", prompt, SamplingParams(temperature=0, max_tokens=1))
            steps, t0 = 0, time.perf_counter()
            while engine.has_unfinished():
                engine.step()
                steps += 1
            stats = engine.stats()
            rows.append({"schedule": schedule, "steps": steps, "seconds": time.perf_counter() - t0,
                         "dense_mb": stats.weight_bytes_dense / 1e6, "expert_mb": stats.weight_bytes_expert / 1e6,
                         "expert_mb_once": 8 * 64 * engine.runner.model.layers[0].moe.expert_bytes / 1e6})
    print(f"one {args.prompt_tokens}-token prompt, Qwen3-MoE-shaped (8 layers, 64 experts, top 8), "
          f"chunked at {args.token_budget} tokens a step")
    print("| schedule | steps | dense weights read (MB) | expert weights read (MB) | every expert once (MB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['schedule']} | {r['steps']} | {r['dense_mb']:.1f} | {r['expert_mb']:.1f} | {r['expert_mb_once']:.1f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
