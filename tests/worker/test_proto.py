"""The committed gRPC modules are what proto/ generates, and the messages round-trip."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_generated_modules_are_current(tmp_path):
    protos = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "proto" / "pdserve_rpc").glob("*.proto"))
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-Iproto", f"--python_out={tmp_path}",
                    f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *protos], cwd=ROOT, check=True)
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated, "protoc wrote nothing"
    for rel in generated:
        committed = ROOT / rel
        assert committed.exists(), f"{rel} is not committed: run `make proto`"
        assert committed.read_text() == (tmp_path / rel).read_text(), f"{rel} is stale: run `make proto`"


def test_messages_round_trip():
    from pdserve_rpc import worker_pb2
    delta = worker_pb2.TokenDelta(request_id="r", token_ids=[5, 6], finish_reason="length",
                                  timings=worker_pb2.Timings(queue=0.01, decode=0.5))
    back = worker_pb2.TokenDelta.FromString(delta.SerializeToString())
    assert list(back.token_ids) == [5, 6] and back.timings.decode == 0.5
    assert back.timings.HasField("queue") and not back.timings.HasField("transfer")
    params = worker_pb2.SamplingParams(temperature=0.0)
    assert not params.HasField("max_tokens") and not params.HasField("seed")


def test_params_at_the_edges_of_their_ranges_cross_the_wire_unchanged():
    from engine.errors import RequestError
    from engine.sampling_params import INT32_MAX, SEED_MAX, SEED_MIN, UINT32_MAX, SamplingParams
    from engine.worker.wire import params_from_proto, params_to_proto
    for params in (SamplingParams(seed=SEED_MIN, top_k=INT32_MAX, stop_token_ids=(INT32_MAX,), max_tokens=UINT32_MAX),
                   SamplingParams(seed=SEED_MAX - 7, min_tokens=UINT32_MAX, max_tokens=UINT32_MAX, n=8)):
        assert params_from_proto(params_to_proto(params)) == params
        for i in range(params.n):
            params.for_child(i)  # every sample's seed is still in range
    for bad in ({"seed": SEED_MAX + 1}, {"seed": SEED_MAX, "n": 2}, {"seed": 2**64}, {"top_k": INT32_MAX + 1}, {"stop_token_ids": (INT32_MAX + 1,)},
                {"max_tokens": UINT32_MAX + 1}, {"max_tokens": True}, {"n": True}, {"temperature": float("inf")},
                {"top_p": float("nan")}, {"ignore_eos": 1}, {"kv_prediction": "maybe"}):
        with pytest.raises(RequestError):
            SamplingParams(**bad)
