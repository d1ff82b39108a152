"""bench/lab/sim_check.py and the comparison it shares with `pdserve plan --verify`: a run the
simulator itself produced, written as a bench result and
replayed, predicts itself exactly (send times, prompt and output lengths carried over), and a
server twice as slow as the profile shows up as the error it is."""

import json
from dataclasses import asdict, replace

import pytest

from bench.lab import sim_check
from bench.metrics import SLO
from scheduler.planner.latency import Fit, LatencyModel, Profile
from scheduler.planner.simulator import SimConfig, SimRequest, Simulator
from scheduler.planner.verify import compare

MODEL = LatencyModel(Fit((0.010, 0.001, 0.0), 1.0, 10), Fit((0.005, 0.0, 0.001), 1.0, 10),
                     Fit((0.005, 0.0, 0.001), 1.0, 10), 1000)


def profile(latency: LatencyModel) -> Profile:
    return Profile("m", "cpu", "float32", 1, 16, 1000, (), (), latency)


def live_run(tmp_path, latency: LatencyModel):
    requests = [SimRequest(100.0 + 0.03 * i, 20 + i, 3 + i % 5) for i in range(30)]
    records = Simulator(latency, SimConfig(colocated=True)).run(requests)
    path = tmp_path / "live.json"
    phases = [{"target": "t", "rate": "20", "duration_s": max(r.chunk_s[-1] for r in records) - 100.0,
               "records": [asdict(r) for r in records]}]
    path.write_text(json.dumps({"phases": phases}))
    return path


def test_a_simulated_run_replayed_predicts_itself(tmp_path, monkeypatch):
    path = live_run(tmp_path, MODEL)
    monkeypatch.setattr(sim_check, "load_profile", lambda name: profile(MODEL))
    out = tmp_path / "rows.json"
    assert sim_check.main(["--live", str(path), "--profile", "p", "--colocated", "1", "--goodput", "ttft:200",
                           "tpot:100", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())
    assert row["num_requests"] == 30 and row["ttft_error"] == pytest.approx(0, abs=1e-9)
    assert row["tpot_error"] == pytest.approx(0, abs=1e-9) and row["attainment_points"] == pytest.approx(0)
    assert 0 < row["live_attainment"] < 1  # the SLOs cut through the run: attainment is informative


def test_a_server_slower_than_its_profile_shows_as_error(tmp_path):
    slow = LatencyModel(*(replace(f, coef=tuple(2 * c for c in f.coef)) for f in
                          (MODEL.prefill, MODEL.decode_small, MODEL.decode_large)), 1000)
    path = live_run(tmp_path, slow)
    phases = json.loads(path.read_text())["phases"]
    config = SimConfig(colocated=True)
    (row,) = compare(phases, config, profile(MODEL), SLO(ttft_ms=200, tpot_ms=100), None)
    assert row.tpot_error < -0.3 and row.ttft_error < -0.3  # the profile predicts much faster than "measured"


def test_a_bad_slo_is_refused_clearly(tmp_path, capsys):
    path = live_run(tmp_path, MODEL)
    assert sim_check.main(["--live", str(path), "--profile", "p", "--goodput", "ttft:fast"]) == 2
    assert "not a number of milliseconds" in capsys.readouterr().out
