"""Front door start-up: seconds from `pdserve serve` starting to /health answering, and the
server process's resident memory once idle (its own; for disagg its Ray cluster and workers
are other processes). Colocated unless --mode says otherwise; run once first so the model's
tokenizer is cached.

    python -m bench.lab.frontdoor_startup --runs 3 [--mode disagg] [--result-json OUT] [-- FLAGS]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def once(args: argparse.Namespace) -> tuple[float, float]:
    port = free_port()
    cmd = [sys.executable, "-m", "scheduler.cli", "serve", "--mode", args.mode, "--port", str(port), *args.extra]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = start + args.timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not answer /health in time")
            time.sleep(0.02)  # polling the server's port
        ready_s = time.monotonic() - start
        time.sleep(args.idle_s)  # idle on purpose before reading memory
        return ready_s, rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--mode", default="colocated")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--idle-s", type=float, default=2.0, help="wait before reading RSS")
    p.add_argument("--timeout-s", type=float, default=300.0)
    p.add_argument("--result-json")
    p.add_argument("extra", nargs="*", help="more `pdserve serve` flags (after --)")
    args = p.parse_args()
    runs = [once(args) for _ in range(args.runs)]
    ready = [r for r, _ in runs]
    rss = [m for _, m in runs]
    result = {"mode": args.mode, "ready_s": ready, "rss_mb": rss,
              "ready_s_median": statistics.median(ready), "rss_mb_median": statistics.median(rss)}
    print(json.dumps(result, indent=1))
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
