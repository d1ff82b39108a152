"""`pdserve plan --verify`: the recommended deployment served on this machine and measured.

The plan's `pdserve serve` flags (with the profile's threads, batch limits and KV blocks, and
prefix caching off, as the simulator assumes) start a server on loopback; `pdserve bench`
sends the workload at the planned rate; then the measured requests (their send times and
lengths) are replayed through the simulator of that deployment, and predicted and measured
attainment, p90 TTFT and p90 TPOT are printed side by side. The comparison (`compare`) is
also what bench/lab/sim_check.py prints for a recorded bench run.
"""

from __future__ import annotations

import json
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from bench.metrics import SLO, RequestRecord, summarize
from scheduler.planner.latency import Profile
from scheduler.planner.simulator import SimConfig, SimRequest, Simulator

STOP_S = 30.0


@dataclass(frozen=True)
class Row:
    target: str
    rate: str
    num_requests: int
    live_ttft_p90_s: float | None
    sim_ttft_p90_s: float | None
    live_tpot_p90_s: float | None
    sim_tpot_p90_s: float | None
    live_attainment: float | None
    sim_attainment: float | None

    @property
    def ttft_error(self) -> float | None:
        return relative(self.sim_ttft_p90_s, self.live_ttft_p90_s)

    @property
    def tpot_error(self) -> float | None:
        return relative(self.sim_tpot_p90_s, self.live_tpot_p90_s)

    @property
    def attainment_points(self) -> float | None:
        if self.sim_attainment is None or self.live_attainment is None:
            return None
        return 100 * (self.sim_attainment - self.live_attainment)


def relative(predicted: float | None, measured: float | None) -> float | None:
    return None if predicted is None or not measured else (predicted - measured) / measured


def replayed(records: list[RequestRecord]) -> list[SimRequest]:
    """The phase's requests as the simulator's input: their send times, the prompt tokens the
    server counted and the tokens it produced (a failed request: one)."""
    return [SimRequest(r.send_s, max(1, r.prompt_tokens), max(1, r.output_tokens))
            for r in sorted(records, key=lambda r: r.send_s)]


def compare(phases: list[dict], config: SimConfig, profile: Profile, slo: SLO, target: str | None) -> list[Row]:
    """Each recorded bench phase against the simulator replaying its requests."""
    rows = []
    for phase in phases:
        if target is not None and phase["target"] != target:
            continue
        live = [RequestRecord(**r) for r in phase["records"]]
        measured = summarize(live, phase["duration_s"], slo)
        simulated_records = Simulator(profile.latency, config).run(replayed(live))
        span = max((r.chunk_s[-1] for r in simulated_records if r.chunk_s), default=0.0)
        predicted = summarize(simulated_records, span - min(r.send_s for r in live), slo)
        rows.append(Row(phase["target"], phase["rate"], len(live), measured.ttft_s.p90, predicted.ttft_s.p90,
                        measured.tpot_s.p90, predicted.tpot_s.p90, measured.attainment, predicted.attainment))
    return rows


def serve_flags(prefill: int, decode: int, profile: Profile, sim: SimConfig, slo: SLO, attainment: float) -> list[str]:
    return ["--mode", "disagg", "--prefill-workers", str(prefill), "--decode-workers", str(decode),
            "--num-threads", str(profile.num_threads), "--block-size", str(sim.block_size),
            "--num-kv-blocks", str(sim.num_blocks), "--max-num-seqs", str(sim.max_num_seqs),
            "--max-num-batched-tokens", str(sim.max_num_batched_tokens), "--no-enable-prefix-caching",
            "--slo-ttft-ms", f"{slo.ttft_ms:g}", "--slo-tpot-ms", f"{slo.tpot_ms:g}",
            "--slo-attainment-target", f"{attainment:g}"]


@dataclass(frozen=True)
class Verification:
    rate: float
    row: Row
    planned_attainment: float | None  # the plan's own prediction, on its own arrivals
    target: float
    margin: float

    @property
    def passed(self) -> bool:
        return self.row.live_attainment is not None and self.row.live_attainment >= self.target - self.margin


def verify(prefill: int, decode: int, rate: float, planned_attainment: float | None, profile: Profile,
           sim: SimConfig, slo: SLO, args, console: Console) -> Verification:
    """Serves prefill + decode workers here, benches them at rate, compares with the simulator."""
    deadline = time.monotonic() + args.verify_timeout_s
    port = _free_port()
    serve = [sys.executable, "-m", "scheduler.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
             *serve_flags(prefill, decode, profile, sim, slo, args.attainment), *shlex.split(args.verify_serve_args)]
    console.print("verify: pdserve " + " ".join(shlex.quote(a) for a in serve[3:]), soft_wrap=True, highlight=False)
    with tempfile.TemporaryDirectory(prefix="pdserve-verify-") as tmp:
        log = open(Path(tmp) / "serve.log", "w")
        server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(f"http://127.0.0.1:{port}", server, deadline, Path(tmp) / "serve.log")
            out = Path(tmp) / "bench.json"
            bench = [sys.executable, "-m", "scheduler.cli", "bench", "--target", f"plan=http://127.0.0.1:{port}",
                     "--dataset", args.workload, "--request-rate", f"{rate:g}", "--num-prompts",
                     str(args.verify_requests), "--goodput", f"ttft:{slo.ttft_ms:g}", f"tpot:{slo.tpot_ms:g}",
                     "--warmup", "2", "--seed", "1", "--result-json", str(out)]
            for flag, value in (("--input-len", args.input_len), ("--output-len", args.output_len)):
                if value is not None:
                    bench += [flag, str(int(value))]
            console.print(f"verify: pdserve bench at {rate:g} req/s, {args.verify_requests} requests", highlight=False)
            done = subprocess.run(bench, capture_output=True, text=True, timeout=max(1.0, deadline - time.monotonic()))
            if done.returncode not in (0, 1):  # 1: some requests missed, still measured
                raise RuntimeError(f"pdserve bench failed ({done.returncode}): {done.stderr[-2000:]}")
            phases = json.loads(out.read_text())["phases"]
        finally:
            _stop(server)
            log.close()
    deployment = replace(sim, num_prefill=prefill, num_decode=decode, colocated=False,
                         transfer_s_per_token=profile.transfer_s_per_token())
    (row,) = compare(phases[-1:], deployment, profile, slo, None)
    return Verification(rate, row, planned_attainment, args.attainment, args.verify_margin)


def print_verification(v: Verification, console: Console) -> None:
    r = v.row
    table = Table(title=f"predicted against measured at {v.rate:g} req/s ({r.num_requests} requests)")
    for name in ("", "predicted", "measured", "error"):
        table.add_column(name, justify="right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f} %"  # noqa: E731
    ms = lambda x: "-" if x is None else f"{1000 * x:.0f} ms"  # noqa: E731
    err = lambda x: "-" if x is None else f"{100 * x:+.0f} %"  # noqa: E731
    points = "-" if r.attainment_points is None else f"{r.attainment_points:+.1f} points"
    table.add_row("SLO attainment", pct(r.sim_attainment), pct(r.live_attainment), points)
    table.add_row("p90 TTFT", ms(r.sim_ttft_p90_s), ms(r.live_ttft_p90_s), err(r.ttft_error))
    table.add_row("p90 TPOT", ms(r.sim_tpot_p90_s), ms(r.live_tpot_p90_s), err(r.tpot_error))
    console.print(table)
    console.print(f"the plan predicted {pct(v.planned_attainment)} on its own arrivals; target {v.target:.0%}, "
                  f"margin {100 * v.margin:.0f} points: " + ("[green]met[/]" if v.passed else "[red]missed[/]"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, server: subprocess.Popen, deadline: float, log: Path) -> None:
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the verifying server exited ({server.returncode}): {log.read_text()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError("the verifying server did not become healthy in time")


def _stop(server: subprocess.Popen) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(STOP_S)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
