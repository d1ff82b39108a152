"""CPU a server's processes use while it has no request: each process of the tree under PID
(its workers, Ray's and vLLM's helpers), in percent of one core over a window.
  python -m bench.lab.idle_cpu PID [--window-s 10] [--result-json F]"""

from __future__ import annotations

import argparse
import json
import time

import psutil


def idle_cpu(pid: int, window_s: float) -> list[dict]:
    root = psutil.Process(pid)
    procs = [root, *root.children(recursive=True)]
    before = {}
    for p in procs:
        try:
            before[p.pid] = (p, sum(p.cpu_times()[:2]), " ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    start = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - start
    out = []
    for p, cpu, cmd in before.values():
        try:
            used = sum(p.cpu_times()[:2]) - cpu
        except psutil.Error:
            continue
        out.append({"pid": p.pid, "name": p.name(), "cmdline": cmd, "core_percent": round(100 * used / elapsed, 2)})
    return sorted(out, key=lambda r: -r["core_percent"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("pid", type=int)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--result-json")
    args = parser.parse_args(argv)
    rows = idle_cpu(args.pid, args.window_s)
    for r in rows[:8]:
        print(f"{r['core_percent']:7.2f} %  {r['pid']:>7}  {r['cmdline']}")
    if args.result_json:
        with open(args.result_json, "w") as f:
            json.dump({"window_s": args.window_s, "processes": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
