"""Overload and soak against a running server: how requests end, the TTFT of those admitted,
and the server's resident memory before and after.

    python -m bench.lab.overload --url http://127.0.0.1:8000 --pid PID burst --streams 300
    python -m bench.lab.overload --url ... --pid PID soak --rate 2.5 --duration-s 600
    python -m bench.lab.overload --url ... --pid PID big --requests 20

`burst` sends N streams at once; `soak` sends Poisson arrivals at a rate for a duration;
`big` sends requests just under the body limit (2 MB prompts: tokenised, then refused for
their length). Each stream is classified: ok (ended with [DONE], no error event), 503
(refused, with Retry-After), or other (any other status, an error event, a timeout). RSS
is the sum over the server process and its descendants (Ray's workers included).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from collections import Counter

import httpx
import psutil

ERRORS: list[str] = []  # messages of error events, for the report


def tree_rss_mb(pid: int) -> dict[str, float]:
    """RSS in MB of the process and each descendant, by name-pid, and their total."""
    root = psutil.Process(pid)
    out = {}
    for p in [root, *root.children(recursive=True)]:
        try:
            out[f"{p.name()}-{p.pid}"] = p.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    out["total"] = sum(out.values())
    return out


async def stream_one(client: httpx.AsyncClient, url: str, body: dict, timeout_s: float) -> tuple[str, float | None]:
    """(outcome, TTFT seconds of an admitted stream)."""
    start = time.monotonic()
    ttft = None
    try:
        async with client.stream("POST", url + "/v1/completions", json=body, timeout=timeout_s) as r:
            if r.status_code != 200:
                await r.aread()
                return ("503" if r.status_code == 503 and r.headers.get("retry-after") else f"http-{r.status_code}",
                        None)
            done = False
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    ERRORS.append(chunk["error"].get("message", ""))
                    return "error-event", ttft
                ttft = ttft if ttft is not None else time.monotonic() - start
            return ("ok" if done else "truncated"), ttft
    except httpx.HTTPError as e:
        return type(e).__name__, ttft


def summarize(results: list[tuple[str, float | None]], wall_s: float) -> dict:
    outcomes = Counter(o for o, _ in results)
    ttfts = sorted(t for o, t in results if o == "ok" and t is not None)

    def pct(q: float) -> float | None:
        return round(ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))], 3) if ttfts else None
    return {"requests": len(results), "outcomes": dict(outcomes), "ttft_p50_s": pct(0.5), "ttft_p99_s": pct(0.99),
            "ttft_mean_s": round(statistics.fmean(ttfts), 3) if ttfts else None, "wall_s": round(wall_s, 1),
            "error_events": sorted(set(ERRORS))[:5]}


async def burst(args, body: dict) -> list:
    limits = httpx.Limits(max_connections=args.streams + 10, max_keepalive_connections=args.streams + 10)
    async with httpx.AsyncClient(limits=limits) as client:
        return await asyncio.gather(*(stream_one(client, args.url, body, args.timeout_s) for _ in range(args.streams)))


async def soak(args, body: dict) -> list:
    rng = random.Random(args.seed)
    tasks, end = [], time.monotonic() + args.duration_s
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(limits=limits) as client:
        while time.monotonic() < end:
            tasks.append(asyncio.create_task(stream_one(client, args.url, body, args.timeout_s)))
            await asyncio.sleep(rng.expovariate(args.rate))
        return await asyncio.gather(*tasks)


async def big(args) -> list:
    body = {"prompt": "a " * 1_000_000, "max_tokens": 4}  # 2 MB: under the default 4 MiB limit
    out = []
    async with httpx.AsyncClient() as client:
        for _ in range(args.requests):
            r = await client.post(args.url + "/v1/completions", json=body, timeout=args.timeout_s)
            out.append((f"http-{r.status_code}", None))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--pid", type=int, required=True, help="the server's process id (RSS of it and its children)")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--timeout-s", type=float, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="append the result as one JSON line to this file")
    sub = parser.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("burst")
    b.add_argument("--streams", type=int, default=300)
    s = sub.add_parser("soak")
    s.add_argument("--rate", type=float, required=True, help="requests per second (Poisson)")
    s.add_argument("--duration-s", type=float, default=600)
    g = sub.add_parser("big")
    g.add_argument("--requests", type=int, default=20)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    body = {"prompt": [rng.randrange(1000, 20000) for _ in range(args.prompt_tokens)], "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens, "temperature": 0, "stream": True}
    before = tree_rss_mb(args.pid)
    start = time.monotonic()
    work = {"burst": lambda: burst(args, body), "soak": lambda: soak(args, body), "big": lambda: big(args)}[args.mode]
    results = asyncio.run(work())
    result = summarize(results, time.monotonic() - start)
    after = tree_rss_mb(args.pid)
    result.update(mode=args.mode, rss_before_mb=round(before["total"]), rss_after_mb=round(after["total"]),
                  rss_by_process_mb={k: round(v) for k, v in after.items() if k != "total" and v > 50})
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
