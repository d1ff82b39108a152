"""Process entry points for multi-process disaggregation tests (spawned: importable)."""

from __future__ import annotations


def prefill_over_gloo(model: str, port: int, prompts: dict[int, list[int]], results) -> None:
    """A prefill engine in its own process: computes each prompt, ships its KV over gloo to the
    decode rank and reports {transfer_id: first token} through `results`."""
    import torch

    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    from engine.transfer.gloo import PREFILL_RANK, GlooSender, connect_pair

    torch.set_num_threads(1)
    engine = Engine(EngineConfig(model=model, num_kv_blocks=128, max_model_len=512, max_num_batched_tokens=64))
    sender = GlooSender(connect_pair("127.0.0.1", port, PREFILL_RANK))
    engine.set_kv_sink(sender)
    for transfer_id, prompt in prompts.items():
        sender.expect(str(transfer_id), transfer_id)
        engine.add_request(str(transfer_id), prompt, SamplingParams(temperature=0, max_tokens=1))
    first = {}
    while engine.has_unfinished():
        for out in engine.step():
            first[int(out.request_id)] = out.new_token_ids[0]
    sender.flush()
    results.put(first)
    assert engine.kv.num_used_blocks == 0
    results.put("done")


def join_and_stall(port: int) -> None:
    """A prefill rank that joins the pair and never sends (a hung peer)."""
    import time

    from engine.transfer.gloo import PREFILL_RANK, connect_pair
    connect_pair("127.0.0.1", port, PREFILL_RANK)
    time.sleep(60)


def send_chunks_over_nccl(port: int, device: str, chunks: int) -> None:
    """A prefill rank on a CUDA device that sends `chunks` seeded layer chunks over NCCL."""
    import torch

    from engine.transfer.base import LayerChunk
    from engine.transfer.gloo import PREFILL_RANK, GlooSender, connect_pair

    sender = GlooSender(connect_pair("127.0.0.1", port, PREFILL_RANK, device=device), device)
    sender.expect("r", 7)
    g = torch.Generator().manual_seed(0)
    for layer in range(chunks):
        packed = torch.randn((2, 3, 16, 2, 8), generator=g).to(device)
        sender.send(LayerChunk("r", layer, 0, packed, last=layer == chunks - 1))
    sender.flush()
