"""`pdserve bench` end to end: against pdserve on the tiny model, against a misbehaving
stub next to a server that is down, a goodput search, and Ctrl-C mid-run."""

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.cli import main
from bench.corpus import TokenCounter
from bench.datasets import DatasetSpec, build_requests
from scheduler.cli import main as pdserve_main

from bench_stub import GAP_S, SLOW_FIRST_S, stub_app
from helpers import free_port, serving, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_against_pdserve_sweep_with_tables_json_and_plots(tiny_server, tiny_llama, tmp_path, capsys):
    out = tmp_path / "r.json"
    # seed 1: every prompt's 8 greedy tokens decode to some text (a reply of lone partial UTF-8 bytes
    # from the random tiny model has no content, which the client rightly counts as a failure)
    code = pdserve_main(["bench", "--target", f"pd={tiny_server.url}", "--dataset", "random", "--input-len", "24",
                         "--output-len", "8", "--num-prompts", "8", "--seed", "1", "--warmup", "2", "--sweep-rates", "20,40",
                         "--tokenizer", str(tiny_llama), "--goodput", "ttft:20000", "tpot:20000",
                         "--result-json", str(out), "--plot-dir", str(tmp_path / "plots")])
    assert code == 0
    printed = capsys.readouterr().out
    assert "TTFT p99 (ms)" in printed and "rate 20" in printed and "counted with the given tokenizer" in printed
    result = json.loads(out.read_text())
    assert [p["rate"] for p in result["phases"]] == ["20", "40"]  # warm-up requests are not phases
    for phase in result["phases"]:
        records = phase["records"]
        assert len(records) == 8 and all(r["ok"] for r in records), [r["error"] for r in records]
        assert all(r["output_tokens"] == 8 and len(r["chunk_s"]) >= 1 for r in records)
        assert all(abs(r["prompt_tokens"] - 24) <= 2 for r in records)  # the server's own count
        assert all(set(r["timings"]) >= {"queue", "prefill", "decode"} for r in records)
        assert phase["summary"]["num_ok"] == 8 and phase["summary"]["attainment"] == 1.0
    assert result["goodput"]["pd"]["distserve_rps"] == 40
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["attainment_vs_rate.png", "phase_breakdown.png", "tpot_cdf.png", "ttft_cdf.png"]
    assert all((tmp_path / "plots" / p).stat().st_size > 5000 for p in plots)


@pytest.fixture()
def stub():
    app = stub_app()
    with serving(app) as url:
        yield url, app


def write_jsonl(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "max_tokens": 3}) + "\n" for p in prompts))
    return path


def test_misbehaving_stub_and_a_dead_server_are_reported_as_they_happened(stub, tmp_path, capsys):
    url, app = stub
    prompts = ["ok"] * 4 + ["slow"] * 2 + ["500", "cut", "error", "hang"]
    out = tmp_path / "r.json"
    code = main(["--target", f"stub={url}", "--target", f"down=http://127.0.0.1:{free_port()}",
                 "--dataset", "file", str(write_jsonl(tmp_path / "w.jsonl", prompts)), "--num-prompts", "10",
                 "--request-timeout-s", "1.5", "--slo-ttft-ms", "200", "--result-json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "did not answer" in printed and "1 failed" in printed and "HTTP 500" in printed
    assert sorted(app.state.prompts) == sorted(prompts)  # each request sent exactly once
    stub_phase, down_phase = json.loads(out.read_text())["phases"]
    records, s = stub_phase["records"], stub_phase["summary"]
    assert len(records) == 10 and s["num_ok"] == 6 and s["num_failed"] == 4
    errors = sorted(r["error"].split(":")[0] for r in records if not r["ok"])
    assert errors == ["HTTP 500", "error event", "stream ended before [DONE]", "timed out after 1.5 s"]
    # which prompt each record was: the workload is rebuilt exactly as the run built it
    workload = build_requests(DatasetSpec("file", 10, path=str(tmp_path / "w.jsonl")), TokenCounter(None), 4096)
    prompt_of = {r["index"]: workload[r["index"]].prompt for r in records}
    assert sorted(prompt_of.values()) == sorted(prompts)
    ok = [r for r in records if r["ok"]]
    assert sorted(prompt_of[r["index"]] for r in ok) == ["ok"] * 4 + ["slow"] * 2
    ttft = {r["index"]: r["chunk_s"][0] - r["send_s"] for r in ok}
    assert all(t >= SLOW_FIRST_S for i, t in ttft.items() if prompt_of[i] == "slow")
    assert all(r["output_tokens"] == 3 for r in ok)
    # the table's figures are those of the stub's behaviour: slow and failed requests miss the
    # TTFT SLO; fast ones meet it (unless the machine delays them past 200 ms)
    met = sum(1 for i, t in ttft.items() if t <= 0.2)
    assert met == sum(1 for i, t in ttft.items() if prompt_of[i] == "ok" and t <= 0.2) <= 4
    assert s["attainment"] == pytest.approx(met / 10)
    assert s["goodput_rps"] == pytest.approx(met / stub_phase["duration_s"])
    ttfts = sorted(ttft.values())
    assert s["ttft_s"]["median"] == pytest.approx(statistics.median(ttfts))
    assert s["ttft_s"]["mean"] == pytest.approx(sum(ttfts) / 6) and s["ttft_s"]["p90"] >= SLOW_FIRST_S
    # per-request TPOT and pooled ITL as the records show them; the stub sleeps GAP_S between
    # tokens, so no request's last token can arrive sooner than two gaps after it was sent (one
    # gap may look shorter than GAP_S when the token before it was read late)
    tpots = [(r["chunk_s"][-1] - r["chunk_s"][0]) / (r["output_tokens"] - 1) for r in ok]
    gaps = [b - a for r in ok for a, b in zip(r["chunk_s"], r["chunk_s"][1:])]
    assert s["tpot_s"]["median"] == pytest.approx(statistics.median(tpots))
    assert s["itl_s"]["median"] == pytest.approx(statistics.median(gaps))
    assert all(r["chunk_s"][-1] - r["send_s"] >= 2 * GAP_S for r in ok) and min(tpots) > 0 and min(gaps) >= 0
    assert stub_phase["duration_s"] >= 1.5  # it waited for the hung request's timeout
    d = down_phase["summary"]
    assert (d["num_ok"], d["num_failed"], d["attainment"]) == (0, 10, 0.0)
    assert all("Connect" in r["error"] for r in down_phase["records"])


def test_find_goodput_searches_each_target(stub, tmp_path):
    url, _ = stub
    out = tmp_path / "r.json"
    code = main(["--base-url", url, "--dataset", "file", str(write_jsonl(tmp_path / "w.jsonl", ["ok"])),
                 "--num-prompts", "4", "--find-goodput", "--request-rate", "20", "--max-search-phases", "3",
                 "--slo-ttft-ms", "1000", "--result-json", str(out)])
    assert code == 0
    goodput = json.loads(out.read_text())["goodput"]["server"]
    assert goodput["distserve_rps"] == 80 and [r for r, _ in goodput["search"]] == [20, 40, 80]


def test_ctrl_c_prints_the_partial_report(stub, tmp_path):
    url, app = stub
    out = tmp_path / "r.json"
    # a terminal-like output, so the progress bar shows how many requests the client has finished
    # Ctrl-C handled whatever this process inherited (a background job of a shell ignores SIGINT,
    # and Python then installs no KeyboardInterrupt handler)
    honour_sigint = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
                     "from bench.cli import main; sys.exit(main(sys.argv[1:]))")
    proc = subprocess.Popen(
        [sys.executable, "-c", honour_sigint, "--base-url", url, "--dataset", "file",
         str(write_jsonl(tmp_path / "w.jsonl", ["ok", "ok", "hang", "hang"])), "--num-prompts", "4",
         "--request-timeout-s", "60", "--result-json", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "COLUMNS": "200", "TTY_COMPATIBLE": "1"})
    printed: list[str] = []
    reader = threading.Thread(target=lambda: printed.extend(iter(lambda: proc.stdout.read(1), "")), daemon=True)
    reader.start()
    try:
        wait_for(lambda: "2/4" in "".join(printed) or proc.poll() is not None,
                 "the client to finish both answered requests", 60)
        assert proc.poll() is None, "".join(printed)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            pytest.fail("the client did not exit within 60 s of Ctrl-C; it printed:\n" + "".join(printed))
        reader.join(10)
        printed = "".join(printed)
    finally:
        proc.kill()
    assert proc.returncode == 130, printed
    assert "interrupted" in printed and "successful requests" in printed
    phase = json.loads(out.read_text())["phases"][0]
    assert phase["interrupted"] and phase["summary"]["num_ok"] == 2 and len(phase["records"]) == 2


def test_vllm_bench_serve_spellings_mean_the_same(tmp_path):
    from bench.config import build_parser, from_args
    path = write_jsonl(tmp_path / "w.jsonl", ["a", "b"])

    def config(*argv):
        return from_args(build_parser().parse_args(["--base-url", "http://127.0.0.1:1", *argv]))
    ours = config("--dataset", "random", "--input-len", "32", "--output-len", "8", "--range-ratio", "0.1",
                  "--warmup", "2", "--endpoint", "chat")
    theirs = config("--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "8",
                    "--random-range-ratio", "0.1", "--num-warmups", "2", "--endpoint", "/v1/chat/completions",
                    "--ignore-eos")
    assert ours == theirs
    assert config("--dataset-name", "sharegpt", "--dataset-path", str(path)).dataset == \
        config("--dataset", "file", str(path)).dataset
    for bad in (["--dataset-name", "sharegpt"], ["--dataset-path", str(path)],
                ["--dataset", "chatbot", "--dataset-name", "random"]):
        with pytest.raises(ValueError):
            config(*bad)


def test_a_run_where_every_request_failed_exits_non_zero(capsys):
    code = main(["--base-url", f"http://127.0.0.1:{free_port()}", "--num-prompts", "2", "--model", "m",
                 "--input-len", "8", "--output-len", "4",
                 "--request-timeout-s", "5"])
    assert code == 1 and "every request failed" in capsys.readouterr().out


def test_vllm_result_json_and_temperature(stub, tmp_path):
    url, app = stub
    ours = tmp_path / "ours.json"
    code = main(["--base-url", url, "--dataset", "file", str(write_jsonl(tmp_path / "w.jsonl", ["ok"] * 4)),
                 "--num-prompts", "4", "--temperature", "0.7", "--result-json", str(ours), "--save-result",
                 "--result-dir", str(tmp_path / "vllm"), "--result-filename", "run.json",
                 "--percentile-metrics", "ttft,itl,e2el", "--metric-percentiles", "50,99"])
    assert code == 0 and {b["temperature"] for b in app.state.bodies} == {0.7}
    flat = json.loads((tmp_path / "vllm" / "run.json").read_text())
    summary = json.loads(ours.read_text())["phases"][0]["summary"]
    assert flat["completed"] == 4 and flat["failed"] == 0 and flat["model_id"] is None
    assert flat["mean_ttft_ms"] == pytest.approx(summary["ttft_s"]["mean"] * 1000)
    assert flat["median_itl_ms"] == pytest.approx(summary["itl_s"]["median"] * 1000)
    assert {"p50_ttft_ms", "p99_ttft_ms", "p99_itl_ms", "p50_e2el_ms", "std_e2el_ms"} <= set(flat)
    assert not any(k.endswith("_tpot_ms") for k in flat)
    for bad in (["--percentile-metrics", "ttft,speed"], ["--metric-percentiles", "x"], ["--result-dir", "d"]):
        assert main(["--base-url", url, "--input-len", "4", "--output-len", "2", *bad]) == 2
