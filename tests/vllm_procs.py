"""Process entry points for the vLLM engine's tests (spawned: one vLLM engine per process, as
in a worker; importable)."""

from __future__ import annotations

import json
import os
import time

# the tiny vLLM test model's engine settings: fp32 (tie-free greedy), chunked prefill of 128
# tokens (a 500-token prompt takes four steps), the CPU backend's smallest block size
ENGINE = dict(dtype="float32", max_model_len=1024, block_size=32, max_num_batched_tokens=128, max_num_seqs=16)
# eager, in the served engines and the reference alike: compiling the model costs each vLLM
# engine ~40 s of two cores, and the connector's layer hooks run inside vLLM's attention op
# either way
EAGER = {"enforce_eager": True}
KV_BYTES = 128 << 20
# the decode side waits for the prefill side to join its link while that side builds its vLLM
# engine (tens of seconds on a busy box): a bound on a hang, not an expectation of speed
PAIR_TIMEOUT_S = 300.0


def engine_config(model: str, **overrides):
    from engine.config import EngineConfig
    kw = dict(ENGINE, kv_cache_memory=str(KV_BYTES), vllm_engine_args=json.dumps(EAGER))
    kw.update(overrides)
    return EngineConfig(engine="vllm", model=model, served_model_name="tiny", **kw)


def reference(model: str, prompts: list[list[int]], max_tokens: int, results) -> None:
    """vLLM's own offline `LLM.generate`, greedy, with the same engine settings."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams
    llm = LLM(model=model, enable_chunked_prefill=True, kv_cache_memory_bytes=KV_BYTES, **ENGINE, **EAGER)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], SamplingParams(temperature=0, max_tokens=max_tokens),
                        use_tqdm=False)
    results.put([list(o.outputs[0].token_ids) for o in outs])


class _Held:
    """The producer's sink in the layer-wise test: a GlooSender that knows what the receiver
    holds, and that stalls the forward at a request's first last-layer chunk until the
    consumer says that request's first layer-0 chunk has landed."""

    def __init__(self, sender, skip: dict[str, int], landed, num_layers: int):
        self.sender, self.skip, self.landed, self.num_layers = sender, skip, landed, num_layers
        self.waited: dict[str, bool] = {}
        self.sent: list[tuple[str, int, float]] = []

    def blocks_held(self, request_id: str) -> int | None:
        return self.skip.get(request_id)

    def send(self, chunk) -> None:
        self.sent.append((chunk.request_id, chunk.layer, time.monotonic()))
        self.sender.send(chunk)
        if chunk.layer == self.num_layers - 1 and chunk.request_id not in self.waited:
            self.waited[chunk.request_id] = self.landed[int(chunk.request_id)].wait(60)


def produce(model: str, port: int, prompts: list[list[int]], skips, landed, results) -> None:
    """A prefill engine: computes each prompt once the consumer has allocated its blocks. It has
    computed every prompt once before (for nobody), so it holds their prefixes in its own cache:
    those blocks must be sent all the same."""
    from engine.sampling_params import SamplingParams
    from engine.transfer.gloo import PREFILL_RANK, GlooSender, connect_pair
    from engine.vllm_backend.engine import VllmEngine

    engine = VllmEngine(engine_config(model), disaggregated=True)
    sender = GlooSender(connect_pair("127.0.0.1", port, PREFILL_RANK, timeout_s=PAIR_TIMEOUT_S))
    skip = skips.get(timeout=120)
    sink = _Held(sender, skip, landed, len(engine.bridge.kv_layers))
    engine.set_kv_sink(sink)
    for i, prompt in enumerate(prompts):  # no route: exported to nobody
        engine.add_request(f"warm-{i}", prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_work():
        engine.step()
    assert engine.stats().prefix_cache_hit_tokens == 0
    for i, prompt in enumerate(prompts):
        sender.expect(str(i), i)
        engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=1))
    while engine.has_work():
        engine.step()
    sender.flush()
    stats = engine.stats()
    results.put(("produced", sink.waited, sink.sent, stats.num_kv_blocks_used, stats.prefix_cache_hit_tokens))


def consume(model: str, ports, skips, prompts: list[list[int]], max_tokens: int, landed, results) -> None:
    """A decode engine: reserves every prompt, lands its KV from the producer, decodes it."""
    import torch

    from engine.sampling_params import SamplingParams
    from engine.transfer.gloo import DECODE_RANK, GlooReceiver, connect_pair, listen
    from engine.vllm_backend.engine import VllmEngine

    engine = VllmEngine(engine_config(model), disaggregated=True)
    port, fd = listen("127.0.0.1")
    ports.put(port)
    receiver = GlooReceiver(connect_pair("127.0.0.1", port, DECODE_RANK, timeout_s=PAIR_TIMEOUT_S, listen_fd=fd),
                            engine.info.kv_block_shape,
                            getattr(torch, engine.info.kv_dtype))
    for i, prompt in enumerate(prompts):
        engine.reserve_prefilled(str(i), prompt, SamplingParams(temperature=0, max_tokens=max_tokens))
        receiver.expect(i, str(i))
    allocated: dict[str, int] = {}
    while len(allocated) < len(prompts):
        engine.step()
        allocated.update(engine.allocated())
    skips.put(allocated)
    arrivals, remaining = [], len(prompts)
    while remaining:
        chunk = receiver.recv()
        arrivals.append((chunk.request_id, chunk.layer, time.monotonic()))
        if chunk.layer == 0:
            landed[int(chunk.request_id)].set()
        assert engine.receive_kv(chunk)
        remaining -= chunk.last
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    while engine.has_work():
        for out in engine.step():
            tokens[int(out.request_id)] += out.new_token_ids
    results.put(("consumed", [tokens[i] for i in range(len(prompts))], arrivals, engine.stats().num_kv_blocks_used,
                 engine.num_requests()))


def fewer_threads_than_cores(model: str, results) -> None:
    """An engine of one torch thread on a machine of more cores, stepped on a thread of its own
    (as the engine loop does): that thread's OpenMP count starts at the core count."""
    import threading

    import torch

    from engine.sampling_params import SamplingParams
    from engine.vllm_backend.engine import VllmEngine
    torch.set_num_threads(1)
    engine = VllmEngine(engine_config(model, num_threads=1))
    engine.add_request("r", [5, 6, 7, 8, 9], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    tokens, errors = [], []

    def run():
        try:
            while engine.has_work():
                for out in engine.step():
                    tokens.extend(out.new_token_ids)
        except Exception as e:  # noqa: BLE001 - reported to the test
            errors.append(repr(e))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(120)
    results.put((tokens, errors, os.cpu_count()))
