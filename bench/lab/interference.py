"""A long prompt arriving while requests decode (issue #7): how long do the decoders stall?

    python -m bench.lab.interference trace --out T.jsonl [--decoders 16] [--decode-tokens 160]
        [--long-tokens 2048] [--at-s 8] [--tokenizer PATH]
    python -m bench.lab.interference report RESULT.json [--json OUT]

`trace` writes a bench trace (JSONL with `at_s`): the decoders' short prompts at 0 s, each
generating --decode-tokens, then one prompt of --long-tokens (2 output tokens) at --at-s, when
every decoder is deep in its decode. `pdserve bench --dataset file T.jsonl` replays it against
each target. `report` reads the bench result and prints, per target, the decoders' largest
inter-token gap (the stall the long prompt caused), their median gap, and the long prompt's
TTFT.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

from bench.corpus import TextSource, TokenCounter


def build_trace(decoders: int, decode_tokens: int, long_tokens: int, at_s: float, counter: TokenCounter,
                seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    source = TextSource("prose", counter)
    rows = [{"prompt": source.window(32, rng)[0], "max_tokens": decode_tokens, "at_s": 0.0}
            for _ in range(decoders)]
    rows.append({"prompt": source.window(long_tokens, rng)[0], "max_tokens": 2, "at_s": at_s})
    return rows


def summarize(phase: dict) -> dict:
    """Decoders are every request but the trace's last (the long prompt)."""
    records = sorted(phase["records"], key=lambda r: r["index"])
    *decoders, long = records
    gaps = [[b - a for a, b in zip(r["chunk_s"], r["chunk_s"][1:])] for r in decoders if r["ok"]]
    pooled = [g for gs in gaps for g in gs]
    return {"target": phase["target"], "ok": sum(r["ok"] for r in records), "requests": len(records),
            "decoders_max_itl_ms": max(pooled) * 1000 if pooled else None,
            "decoders_median_itl_ms": statistics.median(pooled) * 1000 if pooled else None,
            "long_prompt_tokens": long["prompt_tokens"],
            "long_ttft_ms": (long["chunk_s"][0] - long["send_s"]) * 1000 if long["ok"] and long["chunk_s"] else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.lab.interference", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("trace", help="write the trace")
    t.add_argument("--out", required=True)
    t.add_argument("--decoders", type=int, default=16)
    t.add_argument("--decode-tokens", type=int, default=160)
    t.add_argument("--long-tokens", type=int, default=2048)
    t.add_argument("--at-s", type=float, default=8.0)
    t.add_argument("--tokenizer", help="count tokens exactly (HF folder or .gguf)")
    r = sub.add_parser("report", help="the decoders' stall per target, from a bench result")
    r.add_argument("result")
    r.add_argument("--json", help="write the rows here")
    args = parser.parse_args(argv)
    if args.command == "trace":
        rows = build_trace(args.decoders, args.decode_tokens, args.long_tokens, args.at_s,
                           TokenCounter.load(args.tokenizer))
        Path(args.out).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return 0
    rows = [summarize(p) for p in json.loads(Path(args.result).read_text())["phases"]]
    print("| target | ok | decoders' largest ITL (ms) | decoders' median ITL (ms) | long prompt TTFT (ms) |")
    print("|---|---|---|---|---|")
    fmt = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    for row in rows:
        print(f"| {row['target']} | {row['ok']}/{row['requests']} | {fmt(row['decoders_max_itl_ms'])} | "
              f"{fmt(row['decoders_median_itl_ms'])} | {fmt(row['long_ttft_ms'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
