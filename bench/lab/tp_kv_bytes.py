"""Bytes of prompt KV each decode rank receives, for prefill and decode workers of different
tensor-parallel degrees, against one rank each (gloo over loopback, this machine).

    python -m bench.lab.tp_kv_bytes [--prompt-len 512] [--degrees 1x1,2x1,1x2,2x2]

The model is bench/lab/tp_cost.py's random Llama of SmolLM2-135M's size (30 layers, 2 KV
heads of 64, float32). For each degree pair, a prefill and a decode worker run in this process
(their other ranks spawned), one prompt goes through the decode worker's gRPC service, and
each decode rank counts what it received: rank 0 from the request's timings, the others from
their own counters. Prints JSON: bytes per decode rank, their sum, and each rank's share of
the single-rank figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def measure(model: Path, prefill_tp: int, decode_tp: int, prompt_len: int) -> dict:
    import grpc

    from engine.config import EngineConfig, Role
    from engine.sampling_params import SamplingParams
    from engine.worker import wire
    from engine.worker.build import build_worker
    from pdserve_rpc import worker_pb2 as pb
    from pdserve_rpc import worker_pb2_grpc as pb_grpc
    base = dict(model=str(model), max_model_len=prompt_len + 16, num_kv_blocks=prompt_len // 16 + 8,
                enable_prefix_caching=False)
    prefill = build_worker("prefill-0", Role.PREFILL, EngineConfig(tensor_parallel_size=prefill_tp, **base),
                           "127.0.0.1", lambda failed: None)
    decode = build_worker("decode-0", Role.DECODE, EngineConfig(tensor_parallel_size=decode_tp, **base),
                          "127.0.0.1", lambda failed: None)
    try:
        with grpc.insecure_channel(decode.address) as channel:
            request = pb.GenerateRequest(request_id="r", prompt_token_ids=list(range(100, 100 + prompt_len)),
                                         params=wire.params_to_proto(SamplingParams(temperature=0, max_tokens=2)),
                                         prefill_worker=prefill.worker_id, prefill_address=prefill.address)
            deltas = list(pb_grpc.WorkerStub(channel).Generate(request, timeout=600))
        first = int(wire.timings_from_proto(deltas[-1].timings)["kv_bytes"])
        ranks = decode.loop.engine.runner.ranks
        others = decode.loop.call(lambda e: ranks.report()).result(60) if ranks else []
        return {"prefill_tp": prefill_tp, "decode_tp": decode_tp,
                "bytes_per_decode_rank": [first] + [r["kv_bytes"] for r in others]}
    finally:
        decode.stop()
        prefill.stop()


def main() -> None:
    from bench.lab.tp_cost import build
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--degrees", default="1x1,2x1,1x2,2x2", help="prefill x decode ranks, comma-separated")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = build(Path(tmp))
        rows = [measure(model, *map(int, d.split("x")), args.prompt_len) for d in args.degrees.split(",")]
    single = next((r["bytes_per_decode_rank"][0] for r in rows if r["decode_tp"] == r["prefill_tp"] == 1), None)
    for r in rows:
        r["total"] = sum(r["bytes_per_decode_rank"])
        if single:
            r["share_of_single_rank"] = [round(b / single, 3) for b in r["bytes_per_decode_rank"]]
    print(json.dumps({"prompt_len": args.prompt_len, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
