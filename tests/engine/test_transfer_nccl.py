"""KV chunks over NCCL between two processes on two GPUs: the gloo transport's protocol on
device buffers. Skipped without two CUDA devices (CI has none)."""

import multiprocessing as mp

import pytest
import torch

from disagg_procs import send_chunks_over_nccl

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")]


def test_layer_chunks_arrive_intact_on_the_other_gpu():
    from engine.transfer.gloo import DECODE_RANK, GlooReceiver, connect_pair, listen

    (port, fd), chunks = listen("127.0.0.1"), 4
    child = mp.get_context("spawn").Process(target=send_chunks_over_nccl, args=(port, "cuda:0", chunks))
    child.start()
    try:
        receiver = GlooReceiver(connect_pair("127.0.0.1", port, DECODE_RANK, device="cuda:1", listen_fd=fd), (16, 2, 8),
                                torch.float32, timeout_s=60, device="cuda:1")
        receiver.expect(7, "r")
        g = torch.Generator().manual_seed(0)
        for layer in range(chunks):
            chunk = receiver.recv()
            assert (chunk.request_id, chunk.layer, chunk.last) == ("r", layer, layer == chunks - 1)
            assert chunk.packed.device == torch.device("cuda:1")
            assert torch.equal(chunk.packed.cpu(), torch.randn((2, 3, 16, 2, 8), generator=g))
        child.join(60)
        assert child.exitcode == 0
    finally:
        child.kill()
        child.join(10)
