"""vLLM's own load tester against pdserve: `vllm bench serve` with both of its OpenAI backends
measures the TTFT pdserve's own histogram measured (within 10 % of its mean for the run), so
the first content really goes out with the first token."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import httpx
import pytest

from helpers import LiveServer, assert_no_leak

pytestmark = pytest.mark.slow

ENTRY = Path(__file__).parents[1] / "vllm_bench_entry.py"


@pytest.fixture(scope="module")
def server():
    from engine.config import EngineConfig
    srv = LiveServer(EngineConfig(max_model_len=1024, num_kv_blocks=256))
    yield srv
    srv.stop()
    assert_no_leak(srv.engine)


def _ttft_sum_count(url: str) -> tuple[float, float]:
    lines = httpx.get(url + "/metrics").text.splitlines()
    pick = [float(line.split()[-1]) for name in ("sum", "count") for line in lines
            if line.startswith(f"pdserve_request_ttft_seconds_{name} ")]
    return pick[0], pick[1]


BACKENDS = [("openai", "/v1/completions"), ("openai-chat", "/v1/chat/completions")]


def _result(proc) -> dict:
    """The run's result line (vLLM prints its own report on stdout too)."""
    for line in proc.stdout:
        if line.startswith("RESULT "):
            return json.loads(line.removeprefix("RESULT "))
    raise AssertionError(f"vllm bench serve ended with {proc.wait()} and no result")


def test_vllm_bench_serve_measures_pdserve_ttft(server, tmp_path):
    """Both backends, one vLLM process: the TTFT each run reports against the mean of the
    server's own histogram over that run's requests."""
    pytest.importorskip("vllm.benchmarks.serve")
    from engine.models.registry import default_model_path, derived_dir
    model = httpx.get(server.url + "/v1/models").json()["data"][0]["id"]
    tokenizer = str(derived_dir(default_model_path(), "tokenizers"))
    argv = []
    for backend, endpoint in BACKENDS:
        argv += ["::"] if argv else []
        argv += ["--backend", backend, "--base-url", server.url, "--endpoint", endpoint, "--model", model,
                 "--tokenizer", tokenizer, "--dataset-name", "random", "--random-input-len", "128",
                 "--random-output-len", "6", "--num-prompts", "4", "--request-rate", "inf", "--ignore-eos",
                 "--disable-tqdm"]
    log = tmp_path / "vllm-bench.log"
    proc = subprocess.Popen([sys.executable, str(ENTRY), *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=log.open("w"), text=True)
    bound = threading.Timer(600, proc.kill)  # a hung run ends the test, not the suite
    bound.start()
    try:
        for backend, _ in BACKENDS:
            before = _ttft_sum_count(server.url)
            proc.stdin.write("go\n")
            proc.stdin.flush()
            result = _result(proc)
            after = _ttft_sum_count(server.url)
            assert result["completed"] == 4 and result["failed"] == 0 and after[1] - before[1] == 4, backend
            server_mean_ms = (after[0] - before[0]) / (after[1] - before[1]) * 1000
            assert result["mean_ttft_ms"] == pytest.approx(server_mean_ms, rel=0.10), backend
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    finally:
        bound.cancel()
        proc.kill()
        proc.wait()
