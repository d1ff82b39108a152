"""The simulator against the live system: replays what a bench run measured (each request's send
time, prompt and output tokens) through scheduler/planner's simulator timed by a profile, and
prints predicted against measured p90 TTFT, p90 TPOT and SLO attainment for every phase.

    python -m bench.lab.sim_check --live docs/results/sim-check-live-colocated.json --profile smollm2-135m-cpu-1thread \
        --colocated 1 --goodput ttft:2000 tpot:200 --out docs/results/sim-check-colocated.json

The deployment flags must match the server the run measured (workers, KV blocks, batch limits):
the simulator runs the engine's own batcher and KV manager with them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from bench.config import parse_slo
from scheduler.planner.cli import load_profile
from scheduler.planner.simulator import SimConfig
from scheduler.planner.verify import Row, compare
from scheduler.policies import POLICIES


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.0f} %"


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{1000 * x:.0f}"


def table(rows: list[Row]) -> str:
    header = ("| target | rate (req/s) | requests | p90 TTFT live / sim (ms) | error | p90 TPOT live / sim (ms) "
              "| error | attainment live / sim | points |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        att = "-" if r.live_attainment is None else f"{100 * r.live_attainment:.1f} % / {100 * r.sim_attainment:.1f} %"
        pts = "-" if r.attainment_points is None else f"{r.attainment_points:+.1f}"
        lines.append(f"| {r.target} | {r.rate} | {r.num_requests} | {_ms(r.live_ttft_p90_s)} / "
                     f"{_ms(r.sim_ttft_p90_s)} | {_pct(r.ttft_error)} | {_ms(r.live_tpot_p90_s)} / "
                     f"{_ms(r.sim_tpot_p90_s)} | {_pct(r.tpot_error)} | {att} | {pts} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.lab.sim_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--live", required=True, help="a `pdserve bench --result-json` file (its records are replayed)")
    p.add_argument("--profile", required=True, help="profile JSON path or shipped name")
    p.add_argument("--target", help="only this target's phases (default: all)")
    p.add_argument("--colocated", type=int, default=0, metavar="N", help="N colocated workers")
    p.add_argument("--prefill-workers", type=int, default=1)
    p.add_argument("--decode-workers", type=int, default=1)
    p.add_argument("--policy", default="jsq", choices=sorted(POLICIES))
    p.add_argument("--num-kv-blocks", type=int, help="KV blocks per worker (default: the profile's, else what 1 GiB holds)")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--goodput", nargs="+", default=["ttft:2000", "tpot:200"], metavar="KEY:MS",
                   help="the SLOs, as pdserve bench takes them: ttft:MS tpot:MS e2el:MS")
    p.set_defaults(slo_ttft_ms=None, slo_tpot_ms=None, slo_e2el_ms=None)  # what parse_slo reads besides
    p.add_argument("--out", help="write the rows as JSON here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        slo = parse_slo(args)
    except ValueError as e:
        print(f"python -m bench.lab.sim_check: {e}")
        return 2
    profile = load_profile(args.profile)
    blocks = (args.num_kv_blocks or profile.num_kv_blocks
              or (1 << 30) // (profile.kv_bytes_per_token * profile.block_size))
    config = SimConfig(num_prefill=args.prefill_workers, num_decode=args.colocated or args.decode_workers,
                       colocated=bool(args.colocated), policy=args.policy, num_blocks=blocks,
                       block_size=profile.block_size, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       transfer_s_per_token=profile.transfer_s_per_token())
    phases = json.loads(Path(args.live).read_text())["phases"]
    rows = compare(phases, config, profile, slo, args.target)
    print(table(rows))
    if args.out:
        Path(args.out).write_text(json.dumps([dict(asdict(r), ttft_error=r.ttft_error, tpot_error=r.tpot_error,
                                                   attainment_points=r.attainment_points) for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
