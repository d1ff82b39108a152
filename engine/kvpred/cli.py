"""`pdserve kvpred`: train a KV predictor for a base model (engine/kvpred/train.py), and
evaluate one (engine/kvpred/evaluate.py).

    pdserve kvpred train --base MODEL --aux every-other-layer|PATH --data PATH [PATH ...]
        --steps N --out DIR [--seq-len 256] [--prompt-frac 0.75] [--lr 1e-4]
        [--checkpoint-every 50] [--num-threads N] [--seed 0]
    pdserve kvpred eval --predictor DIR --data PATH [PATH ...] [--prompt-lens 128,512,2048]
        [--num-prompts 4] [--json FILE] [--num-threads N]

Run train again with the same --out to resume from the last checkpoint (up to --steps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from engine.cli_help import DefaultsHelpFormatter
from engine.kvpred.predictor import EVERY_OTHER_LAYER, KVPredictor
from engine.kvpred.train import TrainConfig, Trainer, read_texts, token_windows
from engine.models.loader import load_model, open_weights
from engine.models.registry import resolve_model_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve kvpred", description="KV prediction: train a predictor",
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", formatter_class=DefaultsHelpFormatter,
                       help="train an auxiliary model and K/V maps for a base model (the base frozen)")
    t.add_argument("--base", default=None, help="the base model (HF folder or .gguf); default: pdserve's default")
    t.add_argument("--aux", default=EVERY_OTHER_LAYER,
                   help="every-other-layer (the base's even layers, initialised from it) or a smaller model's path")
    t.add_argument("--data", nargs="+", required=True, help="plain-text or JSONL files, or folders of them")
    t.add_argument("--steps", type=int, required=True, help="train up to this many steps (one window each)")
    t.add_argument("--out", required=True, help="folder for the predictor and its checkpoints (resumed if present)")
    t.add_argument("--seq-len", type=int, default=256, help="tokens per training window")
    t.add_argument("--prompt-frac", type=float, default=0.75, help="share of a window that is the prompt")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--checkpoint-every", type=int, default=50)
    t.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all cores)")
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("eval", formatter_class=DefaultsHelpFormatter, help="TTFT, FLOPs and quality of predicted prefill against the base and two "
                                    "baselines of the same cost (the auxiliary model alone, a truncated prompt)")
    e.add_argument("--predictor", required=True, help="a folder written by pdserve kvpred train")
    e.add_argument("--data", nargs="+", required=True, help="held-out plain-text or JSONL files, or folders")
    e.add_argument("--base", default=None, help="the base model (default: the one the predictor was trained for)")
    e.add_argument("--prompt-lens", default="128,512,2048", help="comma-separated prompt lengths in tokens")
    e.add_argument("--num-prompts", type=int, default=4, help="held-out windows per prompt length")
    e.add_argument("--json", default=None, help="also write the results to this file")
    e.add_argument("--num-threads", type=int, default=None, help="torch threads (default: all cores)")
    return parser


def train(args: argparse.Namespace) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from scheduler.tokenizer import Tokenizer
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    config = TrainConfig(args.steps, args.seq_len, args.prompt_frac, args.lr, args.checkpoint_every, args.seed)
    base_path = resolve_model_path(args.base)
    base = load_model(open_weights(base_path), torch.float32, torch.device("cpu"), args.seq_len)
    tokenizer = Tokenizer.load(base_path)
    windows = token_windows((tokenizer.encode(t) for t in read_texts(args.data)), args.seq_len)
    out = Path(args.out)
    step = 0
    if (out / "kvpred.json").exists():
        predictor, meta = KVPredictor.load(out, base.cfg)
        step = int(meta.get("step", 0))
        if predictor.info.base != str(base_path):
            raise ValueError(f"{out} holds a predictor for {predictor.info.base}, not {base_path}")
    elif args.aux == EVERY_OTHER_LAYER:
        predictor = KVPredictor.every_other_layer(base, str(base_path), args.seq_len)
    else:
        predictor = KVPredictor.from_model(base.cfg, str(base_path), args.aux, args.seq_len)
    trainer = Trainer(predictor, base, windows, config, out, step)
    started = time.monotonic()
    columns = (TextColumn("[bold]kvpred train"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}"))
    with Progress(*columns) as progress:
        task = progress.add_task("train", total=config.steps, completed=step, losses="")
        trainer.run(lambda s, loss: progress.update(
            task, completed=s, losses=f"loss {loss.total:.3f} (base {loss.base_ce:.3f}, aux {loss.aux_ce:.3f}, "
                                      f"L1 {loss.l1:.3f})"))
    seconds = time.monotonic() - started
    print(f"trained {len(windows)} windows of {args.seq_len} tokens to step {trainer.step} in {seconds:.0f} s; "
          f"saved to {out}")
    return {"step": trainer.step, "seconds": seconds, "windows": len(windows)}


def evaluate(args: argparse.Namespace) -> dict:
    import json
    from dataclasses import asdict

    from rich.console import Console
    from rich.table import Table

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.kvpred.evaluate import EvalConfig, Evaluator
    from scheduler.tokenizer import Tokenizer
    try:
        lens = tuple(int(x) for x in args.prompt_lens.split(","))
    except ValueError:
        raise ValueError(f"--prompt-lens must be comma-separated integers, not {args.prompt_lens!r}") from None
    config = EvalConfig(lens, args.num_prompts)
    meta = Path(args.predictor) / "kvpred.json"  # missing: the engine refuses the folder
    base = args.base or (json.loads(meta.read_text())["base"] if meta.is_file() else None)
    longest = max(lens) + config.text_tokens + config.gen_tokens
    engine = Engine(EngineConfig(model=base, kv_predictor=args.predictor, device="cpu", dtype="float32",
                                 max_model_len=longest, prefill_schedule="whole", max_num_batched_tokens=longest,
                                 enable_prefix_caching=False, num_threads=args.num_threads))
    tokenizer = Tokenizer.load(engine.model_path)
    documents = [tokenizer.encode(t) for t in read_texts(args.data)]
    results = Evaluator(engine, config).evaluate(documents)
    table = Table(title=f"KV prediction: {args.predictor} (step {engine.kv_predictor.step})")
    for column in ("prompt", "way", "tokens read", "GFLOPs", "TTFT", "TTFT speedup", "top-1 agreement",
                   "perplexity"):
        table.add_column(column, justify="right")
    for L, ways in results.items():
        base_ttft = ways[0].ttft_s
        for r in ways:
            table.add_row(str(L), r.way, str(r.prompt_len), f"{r.flops / 1e9:.1f}",
                          f"{r.ttft_s * 1000:.0f} ms" if r.ttft_s else "-",
                          f"{base_ttft / r.ttft_s:.2f}x" if r.ttft_s else "-", f"{r.agreement:.3f}",
                          f"{r.perplexity:.2f}")
    console = Console()
    (console if console.is_terminal else Console(width=132)).print(table)  # a pipe or a file: not squeezed
    out = {"predictor": args.predictor, "step": engine.kv_predictor.step, "base": str(engine.model_path),
           "data": args.data, "config": asdict(config),
           "results": {str(L): [asdict(r) for r in ways] for L, ways in results.items()}}
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            train(args)
        elif args.command == "eval":
            evaluate(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve kvpred: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
