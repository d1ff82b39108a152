"""Shared fixtures: tiny random models built offline, engines with a leak check, HF
references, and an HTTP server on loopback stopped after its tests (helpers they use are
in helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from helpers import LiveServer, assert_no_leak, hf_greedy
from tiny_models import build_model


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def _torch_threads():
    """A test that sets torch's thread count (an engine of --num-threads 1 in this process)
    leaves the next test the count it found. torch's own setter: vLLM makes
    torch.set_num_threads a no-op once an engine of it runs in the process."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch._C.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model per supported architecture, built lazily."""
    root = tmp_path_factory.mktemp("models")
    cache: dict[str, Path] = {}

    class Lazy(dict):
        def __missing__(self, arch):
            cache[arch] = build_model(root / arch, arch)
            self[arch] = cache[arch]
            return cache[arch]

    return Lazy()


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs) -> Path:
    return tiny_dirs["llama"]


@pytest.fixture
def make_engine():
    """Builds engines from EngineConfig kwargs; checks every block is free afterwards."""
    from engine.config import EngineConfig
    from engine.engine import Engine
    engines = []

    def make(**kwargs):
        kwargs.setdefault("num_kv_blocks", 128)
        kwargs.setdefault("max_model_len", 512)
        engine = Engine(EngineConfig(**kwargs))
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        assert_no_leak(engine)
        engine.close()


@pytest.fixture(scope="session")
def references(tiny_dirs):
    """HF transformers' greedy ids for parity_cases.prompts(), per architecture, computed once."""
    import transformers

    from parity_cases import NUM_TOKENS, prompts
    cache = {}

    def get(arch):
        if arch not in cache:
            model = transformers.AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)
            cache[arch] = hf_greedy(model, prompts(), NUM_TOKENS)
        return cache[arch]
    return get


@pytest.fixture(scope="module")
def tiny_server(tiny_llama):
    from engine.config import EngineConfig
    server = LiveServer(EngineConfig(model=str(tiny_llama), num_kv_blocks=256, max_model_len=256,
                                     served_model_name="tiny"))
    yield server
    server.stop()
    assert_no_leak(server.engine)


@pytest.fixture(scope="session")
def tiny_vllm(tmp_path_factory) -> Path:
    """A tiny random Llama vLLM's CPU backend runs (head size 64: its attention's smallest but one)."""
    return build_model(tmp_path_factory.mktemp("vllm") / "llama", "llama", hidden_size=128, intermediate_size=256,
                       num_attention_heads=2, num_key_value_heads=1, num_hidden_layers=4)


@pytest.fixture(scope="session")
def vllm_prompts() -> list[list[int]]:
    """Eight prompts of 1 to 500 tokens: short ones, one block, several chunks of a chunked prefill."""
    import random
    rng = random.Random(0)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in (1, 9, 31, 64, 130, 257, 390, 500)]


@pytest.fixture(scope="session")
def vllm_reference(tiny_vllm, vllm_prompts) -> list[list[int]]:
    """vLLM's own offline LLM.generate of vllm_prompts, greedy, 16 tokens (in a process of its own)."""
    import multiprocessing as mp

    import vllm_procs
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    proc = ctx.Process(target=vllm_procs.reference, args=(str(tiny_vllm), vllm_prompts, 16, results))
    proc.start()
    try:
        return results.get(timeout=300)
    finally:
        proc.join(30)
        assert proc.exitcode == 0, proc.exitcode


@pytest.fixture(scope="session")
def smollm2_hf(tmp_path_factory) -> Path:
    """The default model as transformers reads its GGUF file (fp32), saved once as an HF folder:
    transformers' GGUF reader takes ~40 s on two cores, its own folders a second."""
    from bench.lab.engine_throughput import write_hf_folder
    return write_hf_folder(tmp_path_factory.mktemp("smollm2-hf"))
