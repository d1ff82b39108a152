"""NCCL transport (GPU): the gloo transport's protocol and classes over a ProcessGroupNCCL,
so KV goes device to device (NVLink or the network) without host copies.

`connect_group(..., device=cuda:N)` (engine/transfer/gloo.py) builds the group here; GlooSender
and GlooReceiver with `device=` keep headers and buffers on that device. The sender's thread
issues each send after the forward queued the layer's export on the current stream, and
ProcessGroupNCCL orders its send after that work, so a layer leaves as soon as it is written.
"""

from __future__ import annotations

from datetime import timedelta

import torch
import torch.distributed as dist


def nccl_group(store: dist.Store, rank: int, size: int, device: torch.device, timeout: timedelta) -> dist.ProcessGroup:
    if not dist.is_nccl_available() or not torch.cuda.is_available():
        raise RuntimeError("NCCL transport needs CUDA and a torch build with NCCL")
    torch.cuda.set_device(device)
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    group = dist.ProcessGroupNCCL(store, rank, size, options)
    # the first collective creates the communicator: once here, not under the first request
    warm = torch.zeros(1, device=device)
    group.allreduce([warm]).wait()
    return group
