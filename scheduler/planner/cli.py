"""`pdserve plan`: prints the recommended prefill and decode workers for a workload, rate and
SLOs, the predicted attainment and per-device goodput against colocated serving, and the
`pdserve serve` flags and Helm values that deploy it (scheduler/planner/plan.py). With
--verify, on a profile of this machine, it then serves the plan here, loads it with
`pdserve bench` at the planned rate and prints predicted against measured
(scheduler/planner/verify.py).

    pdserve plan --profile llama-8b-h100-derived --slo-ttft-ms 250 --slo-tpot-ms 100 \\
        --workload chatbot --rate 20 --gpus 8 [--gpus-per-node 8] [--interconnect-gbps 400] [--jobs N]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from bench.datasets import WORKLOADS
from engine.cli_help import DefaultsHelpFormatter
from scheduler.planner.latency import Profile
from scheduler.planner.plan import Placement, PlanConfig, Planner
from scheduler.planner.search import Progress as OnProgress
from scheduler.planner.search import Searches

PROFILES = Path(__file__).resolve().parent / "profiles"


def load_profile(name: str) -> Profile:
    """A profile JSON by path, or by name among the shipped ones."""
    path = Path(name)
    if not path.exists():
        path = PROFILES / (name if name.endswith(".json") else f"{name}.json")
    if not path.exists():
        shipped = ", ".join(sorted(p.stem for p in PROFILES.glob("*.json")))
        raise FileNotFoundError(f"no profile {name!r} (a path, or one of: {shipped})")
    return Profile.load(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pdserve plan", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--profile", required=True, help="profile JSON path or shipped name (scheduler/planner/profiles)")
    p.add_argument("--slo-ttft-ms", type=float, required=True)
    p.add_argument("--slo-tpot-ms", type=float, required=True)
    p.add_argument("--workload", default="chatbot", choices=sorted(WORKLOADS))
    p.add_argument("--input-len", type=float, default=None, help="move the workload's mean prompt length")
    p.add_argument("--output-len", type=float, default=None, help="move the workload's mean output length")
    p.add_argument("--rate", type=float, required=True, help="requests per second to carry")
    p.add_argument("--gpus", type=int, required=True, help="devices available (workers on CPU)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--interconnect-gbps", type=float, default=400.0, help="between nodes, per device (Gb/s)")
    p.add_argument("--attainment", type=float, default=0.9, help="fraction of requests that must meet both SLOs")
    p.add_argument("--num-requests", type=int, default=400, help="requests per simulation, at least")
    p.add_argument("--min-duration-s", type=float, default=30.0, help="seconds of arrivals per simulation, at least")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--compare-gpus", default="", help="also print per-device goodput at these sizes, e.g. 8,32,128")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="processes the goodput searches run in (the plan is the same for any number)")
    p.add_argument("--json", default=None, help="write the plan as JSON here")
    v = p.add_argument_group("verify", "serve the plan on this machine and measure it (a profile of this machine)")
    v.add_argument("--verify", action="store_true", help="serve the recommended deployment here, load it with "
                   "pdserve bench at the planned rate and print predicted against measured")
    v.add_argument("--verify-requests", type=int, default=64, help="requests the verifying bench sends")
    v.add_argument("--verify-margin", type=float, default=0.05,
                   help="exit non-zero when the measured attainment is below the target by more than this")
    v.add_argument("--verify-serve-args", default="", help="more pdserve serve flags for the verifying server, "
                   "e.g. '--model /path' (the profile's own model by default)")
    v.add_argument("--verify-timeout-s", type=float, default=900.0, help="bound on the whole verification")
    return p


def plan(args: argparse.Namespace, console: Console) -> dict:
    profile = load_profile(args.profile)
    config = PlanConfig(args.slo_ttft_ms / 1000, args.slo_tpot_ms / 1000, workload=args.workload, rate=args.rate,
                        gpus=args.gpus, gpus_per_node=args.gpus_per_node, interconnect_gbps=args.interconnect_gbps,
                        attainment=args.attainment, num_requests=args.num_requests, min_duration_s=args.min_duration_s,
                        input_len=args.input_len, output_len=args.output_len, max_model_len=args.max_model_len)
    if args.jobs < 1:
        raise ValueError("--jobs must be at least 1")
    if args.gpus < 2:
        raise ValueError("--gpus must be at least 2 (one prefill and one decode worker)")
    if args.verify and not profile.device.startswith("cpu"):
        raise ValueError(f"--verify serves the plan on this machine: it needs a profile measured here (a CPU "
                         f"profile; {profile.model} is a {profile.device} profile)")
    planner = Planner(profile, config)
    # KV across nodes: searched too when a size spans more than one node
    links = [profile.transfer_gbps] + ([args.interconnect_gbps] if max(_sizes(args)) > args.gpus_per_node else [])
    started = time.perf_counter()
    with _progress(console) as on_progress, Searches(planner, args.jobs, on_progress) as searches:
        found = planner.goodputs(links, searches)
    intra, inter = found[profile.transfer_gbps], found[links[-1]]
    if not console.is_terminal:
        console.print(f"goodput searches: {searches.num_simulations} simulations in "
                      f"{time.perf_counter() - started:.1f} s ({args.jobs} job{'s' if args.jobs > 1 else ''})")
    for phase in ("prefill", "decode"):
        if not getattr(intra, phase):
            raise ValueError(f"one {phase} instance cannot meet the SLOs for {args.attainment:.0%} of requests even "
                             "at the lowest rate tried: relax --slo-ttft-ms / --slo-tpot-ms or --attainment")
    tp = planner.tp
    need_p, need_d = math.ceil(args.rate / intra.prefill), math.ceil(args.rate / intra.decode)
    need_c = math.ceil(args.rate / intra.colocated) if intra.colocated else None  # None: colocated cannot
    fits = (need_p + need_d) * tp <= args.gpus
    best = planner.placement(args.gpus, intra, inter)
    prefill, decode = (need_p, need_d) if fits else (best.prefill, best.decode)
    rate = args.rate if fits else best.rate
    gbps = profile.transfer_gbps if best.per_node or args.gpus <= args.gpus_per_node else args.interconnect_gbps
    with console.status("simulating the recommended deployment"):
        predicted = planner.check(prefill, decode, rate, gbps)
        colocated = min(need_c or args.gpus // tp, args.gpus // tp)
        predicted_c = planner.colocated_check(colocated, args.rate, intra.colocated_schedule)
    result = {
        "profile": profile.model, "hardware": profile.hardware, "workload": args.workload,
        "slo_ttft_ms": args.slo_ttft_ms, "slo_tpot_ms": args.slo_tpot_ms, "attainment_target": args.attainment,
        "tensor_parallel": {"prefill": tp, "decode": tp},
        "goodput_per_instance": {"prefill": intra.prefill, "decode": intra.decode, "colocated": intra.colocated},
        "rate": args.rate, "gpus": args.gpus, "fits": fits,
        "recommended": {"prefill_workers": prefill, "decode_workers": decode, "rate": rate,
                        "predicted_attainment": predicted},
        "colocated": {"workers": colocated, "predicted_attainment": predicted_c,
                      "needed_workers": need_c, "prefill_schedule": intra.colocated_schedule,
                      "goodput_by_schedule": intra.colocated_by_schedule},
        "per_gpu_goodput": {str(n): _per_gpu(planner, n, intra, inter) for n in _sizes(args)},
    }
    _print(console, result, args, profile)
    if args.verify:
        from scheduler.planner.verify import print_verification, verify
        v = verify(prefill, decode, rate, predicted, profile, planner.sim, planner.slo, args, console)
        print_verification(v, console)
        r = v.row
        result["verify"] = {"rate": v.rate, "requests": r.num_requests, "passed": v.passed, "margin": v.margin,
                            "attainment": {"predicted": r.sim_attainment, "measured": r.live_attainment},
                            "ttft_p90_s": {"predicted": r.sim_ttft_p90_s, "measured": r.live_ttft_p90_s},
                            "tpot_p90_s": {"predicted": r.sim_tpot_p90_s, "measured": r.live_tpot_p90_s}}
    return result


@contextmanager
def _progress(console: Console) -> Iterator[OnProgress | None]:
    """A live bar of searches and simulations on a terminal; nothing elsewhere (the plan
    prints a summary line instead)."""
    if not console.is_terminal:
        yield None
        return
    columns = (SpinnerColumn(), TextColumn("goodput searches"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[sims]} simulations"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("search", total=None, sims=0)
        yield lambda sims, done, total: bar.update(task, completed=done, total=total, sims=sims)


def _sizes(args: argparse.Namespace) -> list[int]:
    extra = [int(x) for x in args.compare_gpus.split(",") if x.strip()]
    return sorted({args.gpus, *extra})


def _per_gpu(planner: Planner, devices: int, intra, inter) -> dict:
    best: Placement = planner.placement(devices, intra, inter)
    colocated = intra.colocated * (devices // planner.tp) / devices
    return {"disaggregated": best.per_device, "prefill": best.prefill, "decode": best.decode,
            "kv_within_nodes": best.per_node, "colocated": colocated,
            "ratio": best.per_device / colocated if colocated else math.inf}


def _print(console: Console, r: dict, args: argparse.Namespace, profile: Profile) -> None:
    g, rec, col = r["goodput_per_instance"], r["recommended"], r["colocated"]
    console.print(f"[bold]{profile.model}[/] on {profile.hardware}; workload {args.workload}; SLOs TTFT "
                  f"{args.slo_ttft_ms:g} ms and TPOT {args.slo_tpot_ms:g} ms for {args.attainment:.0%} of requests")
    console.print(f"one instance (tensor parallel {r['tensor_parallel']['prefill']}) carries: prefill "
                  f"{g['prefill']:.2f} req/s, decode {g['decode']:.2f} req/s, colocated {g['colocated']:.2f} req/s")
    pct = lambda a: "n/a (too large to simulate whole)" if a is None else f"{a:.1%}"  # noqa: E731
    if r["fits"]:
        console.print(f"[bold green]recommended for {args.rate:g} req/s:[/] {rec['prefill_workers']} prefill + "
                      f"{rec['decode_workers']} decode workers, predicted attainment {pct(rec['predicted_attainment'])}")
    else:
        console.print(f"[bold red]{args.rate:g} req/s needs more than {args.gpus} devices[/]; the best split, "
                      f"{rec['prefill_workers']}P{rec['decode_workers']}D, carries {rec['rate']:.2f} req/s "
                      f"(attainment there {pct(rec['predicted_attainment'])})")
    by = ", ".join(f"{name} {rate:.2f}" for name, rate in col["goodput_by_schedule"].items())
    needed = col["needed_workers"] or "no number of"
    console.print(f"colocated, best under --prefill-schedule {col['prefill_schedule']} (req/s per instance: {by}): "
                  f"{needed} workers needed for {args.rate:g} req/s; with {col['workers']}, "
                  f"predicted attainment {pct(col['predicted_attainment'])}")
    table = Table(title="per-device goodput (req/s per device at the SLOs)")
    for name in ("devices", "disaggregated", "split", "KV", "colocated", "disagg / colocated"):
        table.add_column(name, justify="right")
    for n, row in r["per_gpu_goodput"].items():
        table.add_row(n, f"{row['disaggregated']:.3f}", f"{row['prefill']}P{row['decode']}D",
                      "within nodes" if row["kv_within_nodes"] else "across nodes", f"{row['colocated']:.3f}",
                      f"{row['ratio']:.2f}x")
    console.print(table)
    tp = r["tensor_parallel"]["prefill"]
    cuda = profile.device.startswith("cuda")
    if tp > 1 and cuda:
        console.print(f"[yellow]note:[/] the model needs {tp} devices per worker; pdserve's tensor-parallel workers "
                      "run on CPU today, so on GPUs this plan is the planner's estimate of such a deployment")
    degrees = f"--prefill-tp {tp} --decode-tp {tp} " if tp > 1 else ""
    helm_degrees = f",prefill.tensorParallelSize={tp},decode.tensorParallelSize={tp}" if tp > 1 else ""
    gpus = ",prefill.gpusPerPod=1,decode.gpusPerPod=1" if cuda else ""
    console.print("pdserve serve --mode disagg "
                  f"--prefill-workers {rec['prefill_workers']} --decode-workers {rec['decode_workers']} {degrees}"
                  f"--slo-ttft-ms {args.slo_ttft_ms:g} --slo-tpot-ms {args.slo_tpot_ms:g} "
                  f"--slo-attainment-target {args.attainment:g}", soft_wrap=True, highlight=False)
    console.print(f"helm install pdserve deploy/helm/pdserve --set prefill.replicas={rec['prefill_workers']},"
                  f"decode.replicas={rec['decode_workers']}{helm_degrees}{gpus},slo.ttftMs={args.slo_ttft_ms:g},"
                  f"slo.tpotMs={args.slo_tpot_ms:g},slo.attainmentTarget={args.attainment:g}", soft_wrap=True,
                  highlight=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        result = plan(args, console)
    except (ValueError, FileNotFoundError, RuntimeError, TimeoutError) as e:
        print(f"pdserve plan: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 1 if not result.get("verify", {}).get("passed", True) else 0


if __name__ == "__main__":
    sys.exit(main())
