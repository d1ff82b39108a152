"""Small units: packed CPU matmuls, KV-cache block export/import, config parsing, CLI flags."""

import pytest
import torch

from engine.config import EngineConfig, field_help, parse_bytes
from engine.kv.cache import KVCache
from engine.models import packed_gemm


@pytest.mark.skipif(not packed_gemm.available(torch.device("cpu"), torch.float32), reason="needs oneDNN")
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_gemm_matches_mm_for_every_row_count(with_bias):
    w = torch.randn(96, 64)  # [out, in]
    bias = torch.randn(96) if with_bias else None
    packed = packed_gemm.PackedWeight(w)
    for rows in [*range(0, 41), 300]:
        x = torch.randn(rows, 64)
        expected = x @ w.t() + (bias if with_bias else 0)
        torch.testing.assert_close(packed.matmul(x, bias), expected, rtol=1e-5, atol=1e-4)
    rows_of_a_wider_tensor = torch.randn(5, 80)[:, :64]
    torch.testing.assert_close(packed.matmul(rows_of_a_wider_tensor), rows_of_a_wider_tensor @ w.t(),
                               rtol=1e-5, atol=1e-4)


def test_kv_block_export_import_roundtrip():
    src = KVCache(num_layers=2, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8,
                  dtype=torch.float32, device=torch.device("cpu"))
    src.tensor.normal_()
    dst = KVCache(2, 6, 4, 2, 8, torch.float32, torch.device("cpu"))
    packed = src.export_blocks(1, [4, 1, 2])
    assert packed.shape == (2, 3, 4, 2, 8)
    dst.import_blocks(1, [0, 3, 5], packed)
    assert torch.equal(dst.tensor[1, :, [0, 3, 5]], src.tensor[1, :, [4, 1, 2]])
    assert dst.tensor[0].abs().sum() == 0  # other layers untouched


def test_config_values():
    assert parse_bytes("512MiB") == 512 * 2**20 and parse_bytes("2GB") == 2 * 10**9
    with pytest.raises(ValueError):
        parse_bytes("lots")
    with pytest.raises(ValueError):
        EngineConfig(dtype="float8")
    with pytest.raises(ValueError, match="cpu_weight_packing must be one of auto, on, off"):
        EngineConfig(cpu_weight_packing="8,32")
    assert set(field_help(EngineConfig)) == set(EngineConfig.__dataclass_fields__)


def test_cli_flags_are_config_fields():
    import argparse

    from scheduler.config import ServeConfig, add_dataclass_args, from_args
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, ServeConfig)
    add_dataclass_args(parser, EngineConfig)
    ns = parser.parse_args(["--max-num-seqs", "7", "--num-kv-blocks", "99", "--no-enable-prefix-caching",
                            "--api-key", "k", "--port", "1234"])
    engine, serve = from_args(EngineConfig, ns), from_args(ServeConfig, ns)
    assert engine.max_num_seqs == 7 and engine.num_kv_blocks == 99 and not engine.enable_prefix_caching
    assert serve.api_key == "k" and serve.port == 1234 and serve.host == "127.0.0.1"
    with pytest.raises(ValueError):
        ServeConfig(mode="sideways")
