"""Writes the GPU-class profile `scheduler/planner/profiles/llama-8b-h100-derived.json`:
DistServe's latency model for a Llama-3.1-8B-shaped model on an H100 SXM, derived from the
published specifications (no GPU was lent to us to measure one; `pdserve profile` on an H100
replaces it). Every figure and its source is in the profile's notes.

    python -m bench.lab.derive_gpu_profile
"""

from __future__ import annotations

from pathlib import Path

from scheduler.planner.latency import Fit, LatencyModel, Profile

OUT = Path(__file__).resolve().parent.parent / "scheduler/planner/profiles/llama-8b-h100-derived.json"
PEAK_FLOPS, HBM_BYTES_S = 989e12, 3.35e12  # H100 SXM5: dense BF16, HBM3
MFU_LINEAR, MFU_ATTENTION, HBM_EFFICIENCY = 0.6, 0.4, 0.85
PARAMS, LAYERS, HIDDEN, KV_HEADS, HEAD_DIM = 8.03e9, 32, 4096, 8, 128  # Llama-3.1-8B, bf16


def main() -> None:
    weight_bytes = int(PARAMS * 2)
    kv_bytes = 2 * LAYERS * KV_HEADS * HEAD_DIM * 2
    per_token_compute = 2 * PARAMS / (MFU_LINEAR * PEAK_FLOPS)
    attention = 2 * HIDDEN * LAYERS / (MFU_ATTENTION * PEAK_FLOPS)
    weights_read = weight_bytes / (HBM_EFFICIENCY * HBM_BYTES_S) + 0.001
    kv_read = kv_bytes / (HBM_EFFICIENCY * HBM_BYTES_S)
    latency = LatencyModel(Fit((0.004, per_token_compute, attention), 1.0, 0),
                           Fit((weights_read, kv_read, 2e-5), 1.0, 0),
                           Fit((weights_read, kv_read, per_token_compute), 1.0, 0), 64)
    notes = {
        "status": "derived from published specifications, not measured (no GPU was lent to this task); "
                  "replace with `pdserve profile` on an H100 when one is available",
        "model": "Llama-3.1-8B shape (its config.json): 8.03e9 parameters, 32 layers, hidden 4096, 32 query / 8 KV "
                 "heads of 128, bf16: 16.06 GB of weights, 131,072 KV bytes per token (2 x 32 x 8 x 128 x 2 B)",
        "hardware": "NVIDIA H100 SXM5 80GB datasheet: 989 TFLOPS dense BF16, 3.35 TB/s HBM3, NVLink 4 at 900 GB/s "
                    "per GPU (450 GB/s each way)",
        "prefill": "a = 4 ms fixed (launches and scheduling of 32 layers, no CUDA graph); b = 2 x params FLOPs per "
                   "token at 60 % of peak (2.71e-5 s); c = causal attention, 2 x hidden x layers FLOPs per token "
                   "pair, at 40 % of peak (6.6e-10 s)",
        "decode": "a = the weights read once per step at 85 % of HBM bandwidth (5.6 ms) plus 1 ms of launches and "
                  "sampling (CUDA graphs); b = 131,072 KV bytes per context token at 85 % of HBM bandwidth "
                  "(4.6e-8 s); c = 20 us per request below 64, and from 64 on the per-token compute 2 x params "
                  "at 60 % of peak (2.71e-5 s): large batches turn compute-bound",
        "check": f"a 1,000-token prefill: {latency.prefill_s([1000]) * 1000:.0f} ms; 64 requests at 500 tokens of "
                 f"context: {latency.decode_s([500] * 64) * 1000:.1f} ms per step; 16 at 500: "
                 f"{latency.decode_s([500] * 16) * 1000:.1f} ms",
        "transfer_gbps": "NVLink 4: 450 GB/s each way at 80 % achievable = 2,880 Gb/s between two GPUs of a node",
        "engine": "batch limits as vLLM's on H100: max_num_seqs 256, max_num_batched_tokens 8192",
    }
    profile = Profile(model="llama-3.1-8b-shape", device="cuda", dtype="bfloat16", num_threads=0, block_size=16,
                      kv_bytes_per_token=kv_bytes, prefill_samples=(), decode_samples=(), latency=latency,
                      hardware="NVIDIA H100 SXM5 80GB (derived, see notes)", command="python -m bench.lab.derive_gpu_profile",
                      notes=notes, transfer_gbps=2880.0, device_memory_bytes=80 * 10**9, weight_bytes=weight_bytes,
                      max_num_seqs=256, max_num_batched_tokens=8192)
    OUT.write_text(profile.to_json())
    print(f"wrote {OUT}: {notes['check']}")


if __name__ == "__main__":
    main()
