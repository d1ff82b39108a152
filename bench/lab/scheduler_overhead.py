"""What the front door and the global scheduler add per request, with a fake engine.

Starts a local Ray cluster, the real global scheduler and fake workers (bench/lab/fake_worker.py:
the real gRPC service, an engine that answers at once), and the real HTTP front door. Then,
in alternating rounds so drift hits both alike, it times:
  direct   a Generate call straight to the fake decode worker over gRPC (no front door),
  served   the same request through HTTP /v1/completions (validation, routing by the
           scheduler actor, the gRPC stream, detokenization, the JSON response),
and reports served - direct at p50 and p99 as the per-request overhead, the latency of one
routing call to the scheduler actor (front doors route on a local replica of its view
instead, see scheduler/router.py), and routing decisions per second: through the actor with
many calls in flight, on a front door's Router replica, and the policy function alone.

    python -m bench.lab.scheduler_overhead --requests 2000 --result-json docs/results/scheduler-overhead.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import threading
import time

from bench.metrics import percentile
from scheduler.cluster import LOOPBACK_ENV

SCHEDULER = "pdserve-bench-scheduler"


def summary_ms(values_s: list[float]) -> dict[str, float]:
    ms = [v * 1e3 for v in values_s]
    return {"p50": round(percentile(ms, 50), 3), "p99": round(percentile(ms, 99), 3), "mean": round(statistics.fmean(ms), 3)}


def front_door(ray_address: str, ports) -> None:
    """The HTTP front door in its own process (as `pdserve serve` runs it), on the bench's Ray."""
    os.environ.update(LOOPBACK_ENV)
    import ray
    import uvicorn

    from engine.models.registry import resolve_model_path
    from scheduler.api.server import ServerState, build_app
    from scheduler.disagg_client import DisaggClient
    from scheduler.engine_client import ModelInfo
    from scheduler.tokenizer import Tokenizer

    ray.init(address=ray_address, namespace=SCHEDULER, log_to_driver=False)
    scheduler = ray.get_actor(SCHEDULER, namespace=SCHEDULER)
    app = build_app(ServerState(DisaggClient(scheduler, ModelInfo("fake", 4096, 32000)),
                                Tokenizer.load(resolve_model_path(None)), "fake"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    ports.put(server.servers[0].sockets[0].getsockname()[1])
    thread.join()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per path")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--prefill-workers", type=int, default=4)
    parser.add_argument("--decode-workers", type=int, default=4)
    parser.add_argument("--route-calls", type=int, default=20000, help="routing calls in flight at once")
    parser.add_argument("--warmup", type=int, default=200, help="untimed request pairs first (channels, caches)")
    parser.add_argument("--result-json")
    args = parser.parse_args(argv)

    os.environ.update(LOOPBACK_ENV)
    import grpc
    import httpx
    import ray

    from bench.lab.fake_worker import FakeWorkerActor
    from engine.sampling_params import SamplingParams
    from engine.worker.wire import generate_request
    from pdserve_rpc import worker_pb2_grpc as pb_grpc
    from scheduler.global_scheduler import GlobalScheduler
    from scheduler.policies import Ask, WorkerLoad, join_shortest_queue
    from scheduler.router import Router

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace=SCHEDULER)
    try:
        scheduler = ray.remote(GlobalScheduler).options(num_cpus=0, name=SCHEDULER, namespace=SCHEDULER).remote("jsq")
        roles = [("prefill", i) for i in range(args.prefill_workers)] + \
                [("decode", i) for i in range(args.decode_workers)]
        fakes = [ray.remote(FakeWorkerActor).options(num_cpus=0).remote(f"{r}-{i}", r, scheduler) for r, i in roles]
        infos = ray.get([f.describe.remote() for f in fakes])
        decode_address = next(i.address for i in infos if i.role == "decode")

        ctx = multiprocessing.get_context("spawn")
        ports = ctx.Queue()
        front = ctx.Process(target=front_door, args=(ray.get_runtime_context().gcs_address, ports), daemon=True)
        front.start()
        port = ports.get(timeout=120)
        prompt = list(range(10, 10 + args.prompt_len))
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        stub = pb_grpc.WorkerStub(grpc.insecure_channel(decode_address))
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        body = {"model": "fake", "prompt": prompt, "max_tokens": args.max_tokens, "temperature": 0}

        def direct(i: int) -> float:
            start = time.perf_counter()
            deltas = list(stub.Generate(generate_request(f"d{i}", prompt, params)))
            assert deltas[-1].finish_reason == "length"
            return time.perf_counter() - start

        def served(i: int) -> float:
            start = time.perf_counter()
            r = http.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return time.perf_counter() - start

        for i in range(args.warmup):
            direct(i), served(i)
        times: dict[str, list[float]] = {"direct": [], "served": []}
        for i in range(args.requests):
            times["direct"].append(direct(i))
            times["served"].append(served(i))

        route_s = []
        for _ in range(min(args.requests, 2000)):
            start = time.perf_counter()
            ray.get(scheduler.route.remote(args.prompt_len))
            route_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray.get([scheduler.route.remote(args.prompt_len) for _ in range(args.route_calls)])
        actor_rate = args.route_calls / (time.perf_counter() - start)
        router = Router("jsq")
        router.update(ray.get(scheduler.snapshot.remote()))
        n = 10 * args.route_calls
        start = time.perf_counter()
        for _ in range(n):
            router.route(args.prompt_len)
        router_rate = n / (time.perf_counter() - start)
        prefill = [WorkerLoad(f"p{i}", pending_prefill_tokens=i * 7) for i in range(args.prefill_workers)]
        decode = [WorkerLoad(f"d{i}", num_free_blocks=1000 + i) for i in range(args.decode_workers)]
        n = 10 * args.route_calls
        start = time.perf_counter()
        for _ in range(n):
            join_shortest_queue(prefill, decode, Ask(args.prompt_len))
        policy_rate = n / (time.perf_counter() - start)

        direct_ms, served_ms = summary_ms(times["direct"]), summary_ms(times["served"])
        result = {
            "requests": args.requests, "prompt_len": args.prompt_len, "max_tokens": args.max_tokens,
            "workers": {"prefill": args.prefill_workers, "decode": args.decode_workers},
            "direct_ms": direct_ms, "served_ms": served_ms,
            "overhead_ms": {q: round(served_ms[q] - direct_ms[q], 3) for q in ("p50", "p99")},
            "route_call_ms": summary_ms(route_s),
            "routes_per_s": {"actor": round(actor_rate), "router_replica": round(router_rate),
                             "policy_function": round(policy_rate)},
        }
        print(json.dumps(result, indent=2))
        if args.result_json:
            with open(args.result_json, "w") as f:
                json.dump(result, f, indent=2)
        front.terminate()
        front.join(10)
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
