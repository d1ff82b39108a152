"""`pdserve profile`: measures the engine on this machine and fits DistServe's latency model.

    pdserve profile [--model M] [--out scheduler/planner/profiles/NAME.json] [--quick]

Prefill: batches of k random prompts of length l (prefix caching off, so nothing is reused),
each timed as the one engine step that computes them all. Decode: b requests with
`context` tokens each, prefilled first, then the median of several decode steps. Every
shape runs once untimed first (torch's per-shape set-up would otherwise count). KV
transfer: a two-rank link on this machine (gloo on CPU over loopback, NCCL between two GPUs
when there are two) ships packed KV of 64 blocks a message, 16 untimed then 64 timed; the
bandwidth is bytes over time. The samples and the fits (scheduler/planner/latency.py, with
R^2) go into a profile JSON that `pdserve plan` and the simulator read.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import Progress

from engine.cli_help import DefaultsHelpFormatter
from engine.config import EngineConfig
from engine.sampling_params import SamplingParams
from scheduler.planner.latency import DecodeSample, PrefillSample, Profile, fit_model

FULL = {"prefill_lengths": (16, 32, 64, 128, 256, 512, 1024), "prefill_batches": (1, 2, 4),
        "decode_batches": (1, 2, 4, 8, 16, 32), "decode_contexts": (128, 512, 1024), "decode_steps": 5}
QUICK = {"prefill_lengths": (8, 16, 32, 64), "prefill_batches": (1, 2),
         "decode_batches": (1, 2, 4, 8), "decode_contexts": (16, 48), "decode_steps": 3}


class _Prompts:
    def __init__(self, vocab_size: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.vocab_size = vocab_size
        self.count = 0

    def take(self, n: int, length: int) -> list[tuple[str, list[int]]]:
        out = []
        for _ in range(n):
            self.count += 1
            out.append((f"p{self.count}", self.rng.integers(10, self.vocab_size, length).tolist()))
        return out


def time_prefill(engine, prompts: _Prompts, length: int, batch: int) -> float:
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    for rid, ids in prompts.take(batch, length):
        engine.add_request(rid, ids, params)
    start = time.perf_counter()
    outputs = engine.step()
    elapsed = time.perf_counter() - start
    if len(outputs) != batch or engine.has_unfinished():
        raise RuntimeError(f"the {batch} x {length} prefill did not fit in one step; raise the token budget")
    return elapsed


def time_decode(engine, prompts: _Prompts, context: int, batch: int, steps: int) -> float:
    params = SamplingParams(max_tokens=steps + 2, temperature=0.0, ignore_eos=True)
    batch_prompts = prompts.take(batch, context)
    ids = [rid for rid, _ in batch_prompts]
    for rid, prompt in batch_prompts:
        engine.add_request(rid, prompt, params)
    if len(engine.step()) != batch:  # the prefill, in one step
        raise RuntimeError(f"the {batch} x {context} decode batch did not prefill in one step")
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        outputs = engine.step()
        times.append(time.perf_counter() - start)
        if len(outputs) != batch:
            raise RuntimeError(f"a decode step of {batch} requests returned {len(outputs)} tokens")
    for rid in ids:
        engine.abort(rid)
    engine.step()
    if engine.kv.num_used_blocks:
        raise RuntimeError("the profiler left KV blocks behind")
    return statistics.median(times)


def time_transfer(block_shape: tuple[int, int, int], dtype, block_size: int, num_blocks: int = 64,
                  messages: int = 64) -> float | None:
    """Gb/s of KV between two ranks of a link on this machine (None: no second GPU for NCCL)."""
    import threading

    import torch

    from engine.transfer.base import LayerChunk
    from engine.transfer.gloo import DECODE_RANK, PREFILL_RANK, GlooReceiver, GlooSender, connect_pair, listen
    device = "cpu"
    if torch.cuda.is_available():
        if torch.cuda.device_count() < 2:
            return None
        device = "cuda"
    port, listen_fd = listen("127.0.0.1")
    groups: dict = {}
    host = threading.Thread(target=lambda: groups.setdefault("d", connect_pair("127.0.0.1", port, DECODE_RANK,
                                                                              30, device, listen_fd)))
    host.start()
    sender = GlooSender(connect_pair("127.0.0.1", port, PREFILL_RANK, 30, device), device)
    host.join()
    receiver = GlooReceiver(groups["d"], block_shape, dtype, timeout_s=60, device=device)
    packed = torch.randn(2, num_blocks, *block_shape).to(dtype)

    def ship(n: int) -> float:
        for i in range(n):
            receiver.expect(i + 1, f"r{i}")
            sender.expect(f"r{i}", i + 1)
        start = time.perf_counter()
        done = threading.Thread(target=lambda: [receiver.recv() for _ in range(n)])
        done.start()
        for i in range(n):
            sender.send(LayerChunk(f"r{i}", 0, 0, packed, last=True))
        done.join()
        return time.perf_counter() - start

    ship(16)
    seconds = ship(messages)
    sender.close()
    return messages * packed.numel() * packed.element_size() * 8 / seconds / 1e9


def profile(config: EngineConfig, shape: dict, console: Console | None = None) -> tuple[list, list, object]:
    from engine.engine import Engine
    lengths, batches = shape["prefill_lengths"], shape["prefill_batches"]
    # one step prefills any profiled batch, so a decode batch starts (and stays) in step
    budget = max(max(lengths) * max(batches), max(shape["decode_contexts"]) * max(shape["decode_batches"]))
    longest = max(max(lengths) + 1, max(shape["decode_contexts"]) + shape["decode_steps"] + 2)
    blocks_each = -(-longest // config.block_size)
    engine = Engine(replace(config, enable_prefix_caching=False, max_num_batched_tokens=budget, max_model_len=longest,
                            max_num_seqs=max(max(shape["decode_batches"]), max(batches)),
                            num_kv_blocks=max(shape["decode_batches"]) * blocks_each + 8))
    prompts = _Prompts(engine.model_config.vocab_size)
    prefill_shapes = [(n, k) for n in lengths for k in batches if n * k <= budget and n < engine.max_model_len]
    decode_shapes = [(c, b) for c in shape["decode_contexts"] for b in shape["decode_batches"]
                     if c + shape["decode_steps"] + 2 <= engine.max_model_len]
    prefill, decode = [], []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("profiling", total=len(prefill_shapes) + len(decode_shapes))
        for n, k in prefill_shapes:
            time_prefill(engine, prompts, n, k)  # untimed: per-shape set-up
            seconds = statistics.median(time_prefill(engine, prompts, n, k) for _ in range(3))
            prefill.append(PrefillSample((n,) * k, seconds))
            progress.advance(task)
        for c, b in decode_shapes:
            time_decode(engine, prompts, c, b, 1)
            seconds = time_decode(engine, prompts, c, b, shape["decode_steps"])
            middle = c + 1 + shape["decode_steps"] // 2  # context during the timed steps, midway
            decode.append(DecodeSample((middle,) * b, seconds))
            progress.advance(task)
    return prefill, decode, engine


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve profile", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model folder or .gguf (default: SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--num-threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="where to write the profile JSON (default: print it)")
    p.add_argument("--quick", action="store_true", help="small shapes only (tests, a first look)")
    p.add_argument("--transfer-only", action="store_true",
                   help="measure only the KV transfer bandwidth and update it in the --out profile")
    p.add_argument("--refit", action="store_true",
                   help="measure nothing: refit the latency model from the samples stored in the --out profile")
    p.add_argument("--large-batch-from", type=int, default=16,
                   help="decode batches this size or larger get their own fit (DistServe's small/large split)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, num_threads=args.num_threads)
    if args.transfer_only:
        return _update_transfer(config, args.out, console)
    if args.refit:
        if not args.out:
            console.print("--refit needs --out PROFILE.json (the profile to refit)")
            return 2
        old = Profile.load(args.out)
        result = replace(old, latency=fit_model(old.prefill_samples, old.decode_samples, args.large_batch_from))
        Path(args.out).write_text(result.to_json())
        _print_fits(console, result.latency, result.transfer_gbps)
        return 0
    shape = QUICK if args.quick else FULL
    prefill, decode, engine = profile(config, shape, console)
    runner = engine.runner
    mc = engine.model_config
    kv_bytes = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * runner.dtype.itemsize
    import torch
    device = str(runner.device)
    hardware = (torch.cuda.get_device_name(runner.device) if device.startswith("cuda")
                else f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    transfer_gbps = time_transfer((engine.config.block_size, mc.num_kv_heads, mc.head_dim), runner.dtype,
                                  engine.config.block_size)
    result = Profile(model=engine.model_path.name, device=device, dtype=str(runner.dtype).removeprefix("torch."),
                     num_threads=torch.get_num_threads(), block_size=engine.config.block_size,
                     kv_bytes_per_token=kv_bytes, prefill_samples=tuple(prefill), decode_samples=tuple(decode),
                     latency=fit_model(prefill, decode, args.large_batch_from), hardware=hardware,
                     command="pdserve profile " + shlex.join(argv if argv is not None else sys.argv[1:]),
                     transfer_gbps=transfer_gbps,  # the blocks a server with this config would have:
                     num_kv_blocks=config.num_kv_blocks or (config.kv_cache_bytes or runner.memory.kv_bytes()) // (kv_bytes * config.block_size),
                     max_num_seqs=config.max_num_seqs, max_num_batched_tokens=config.max_num_batched_tokens,
                     num_layers=engine.model_config.num_layers)
    _print_fits(console, result.latency, transfer_gbps)
    if args.out:
        with open(args.out, "w") as f:
            f.write(result.to_json())
    else:
        sys.stdout.write(result.to_json())
    return 0


def _print_fits(console: Console, lat, transfer_gbps: float | None) -> None:
    console.print(f"prefill: {lat.prefill.coef} R^2 {lat.prefill.r2:.4f}; decode small: {lat.decode_small.coef} "
                  f"R^2 {lat.decode_small.r2:.4f}; large: {lat.decode_large.coef} R^2 {lat.decode_large.r2:.4f}; "
                  f"KV transfer: {transfer_gbps or 0:.1f} Gb/s")


def _update_transfer(config: EngineConfig, path: str | None, console: Console) -> int:
    from engine.engine import Engine
    if not path:
        console.print("--transfer-only needs --out PROFILE.json (the profile to update)")
        return 2
    profile = Profile.load(path)
    engine = Engine(replace(config, num_kv_blocks=64, max_model_len=1024))
    mc = engine.model_config
    gbps = time_transfer((profile.block_size, mc.num_kv_heads, mc.head_dim), engine.runner.dtype, profile.block_size)
    with open(path, "w") as f:
        notes = {**profile.notes, "transfer_gbps": "pdserve profile --transfer-only (gloo over loopback between "
                 "two threads of one process)" if gbps and engine.runner.device.type == "cpu" else "pdserve profile "
                 "--transfer-only"}
        f.write(replace(profile, transfer_gbps=gbps, notes=notes).to_json())
    console.print(f"KV transfer: {gbps or 0:.1f} Gb/s, written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
