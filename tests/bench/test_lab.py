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


@pytest.mark.slow
def test_structured_overhead_runs():
    run = subprocess.run([sys.executable, "-m", "bench.lab.structured_overhead", "--batch", "1", "--tokens", "6",
                          "--repeats", "1"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout)
    assert result["decode_steps_timed"] >= 1 and "grammar cost per step (ms)" in result["decode_step_ms"]
