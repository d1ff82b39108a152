"""How fast the planner's simulator runs: events per second over one decode-instance and one
colocated simulation of a workload, as `pdserve plan` runs them (no early stop).

    python -m bench.lab.sim_speed [--profile llama-8b-h100-derived] [--workload chatbot] [--rate 8] [--repeat 3]

Prints a JSON line: events, seconds (best of --repeat) and events/s per kind.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import replace

from scheduler.planner.cli import load_profile
from scheduler.planner.plan import PlanConfig, Planner, workload_requests
from scheduler.planner.simulator import Simulator


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.lab.sim_speed", description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", default="llama-8b-h100-derived")
    ap.add_argument("--workload", default="chatbot")
    ap.add_argument("--rate", type=float, default=8.0, help="requests/s of the simulated arrivals")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args(argv)
    planner = Planner(load_profile(args.profile), PlanConfig(0.5, 0.1, workload=args.workload))
    requests = workload_requests(planner.config, args.rate)
    configs = {"decode": replace(planner.sim, num_prefill=max(1, math.ceil(args.rate / 4))),
               "colocated": replace(planner.sim, colocated=True)}
    out = {"profile": args.profile, "workload": args.workload, "rate": args.rate, "requests": len(requests)}
    for kind, config in configs.items():
        best, events = math.inf, 0
        for _ in range(args.repeat):
            sim = Simulator(planner.latency, config)
            started = time.perf_counter()
            sim.run(requests)
            best = min(best, time.perf_counter() - started)
            events = sim.num_events
        out[kind] = {"events": events, "seconds": round(best, 3), "events_per_s": round(events / best)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
