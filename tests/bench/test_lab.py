"""The lab scripts the docs cite still run: every module imports, and the front-door overhead
measurement runs end to end in a tiny form (Ray, the real scheduler, fake workers)."""

import json
import pkgutil
import subprocess
import sys

import pytest

import bench.lab

from helpers import ROOT


def test_every_lab_module_imports():
    names = [f"bench.lab.{m.name}" for m in pkgutil.iter_modules(bench.lab.__path__)]
    assert "bench.lab.scheduler_overhead" in names
    code = "import importlib, sys; [importlib.import_module(n) for n in sys.argv[1:]]"
    out = subprocess.run([sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_scheduler_overhead_runs(tmp_path):
    out = tmp_path / "overhead.json"
    run = subprocess.run([sys.executable, "-m", "bench.lab.scheduler_overhead", "--requests", "20", "--warmup", "5",
                          "--route-calls", "100", "--prefill-workers", "1", "--decode-workers", "1", "--result-json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["overhead_ms"]) == {"p50", "p99"} and result["routes_per_s"]["router_replica"] > 0


def _lab_json(module: str, *args: str) -> dict:
    """A lab script's JSON report on stdout."""
    run = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.slow
def test_structured_overhead_runs():
    result = _lab_json("bench.lab.structured_overhead", "--batch", "1", "--tokens", "6", "--repeats", "1")
    assert result["decode_steps_timed"] >= 1 and "grammar cost per step (ms)" in result["decode_step_ms"]


@pytest.mark.slow
def test_engine_throughput_runs_every_system(smollm2_hf, tmp_path):
    out = tmp_path / "throughput.json"
    run = subprocess.run([sys.executable, "-m", "bench.lab.engine_throughput", "--quick", "--hf-folder", str(smollm2_hf),
                          "--vllm-dtypes", "float32", "--result-json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results) == {"pdserve", "hf-fp32", "vllm-fp32"}
    assert all(r["decode_tok_s"]["2"] > 0 and r["prefill_tok_s"] > 0 for r in results.values())
    assert "decode tok/s, batch 2" in run.stdout


@pytest.mark.slow
def test_gemm_paths_runs():
    result = _lab_json("bench.lab.gemm_paths", "--rows", "1,8", "--layers", "1", "--vocab", "64", "--repeats", "1")
    assert {"F.linear (MKL)", "oneDNN packed once"} <= set(result["ms"]["8"])


def test_decode_profile_runs():
    result = _lab_json("bench.lab.decode_profile", "--batch", "2", "--context", "8", "--steps", "2")
    assert result["per_step_ms"]["matmul"] > 0 and "python and dispatch (wall - ops)" in result["per_step_ms"]
