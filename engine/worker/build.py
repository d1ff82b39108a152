"""Assembles a worker from its config: one engine, its loop thread, both roles (prefill:
ships prompt KV; decode: owns requests and pulls KV from prefill peers, or prefills them
itself), the prefill peers and the gRPC servicer, served on `host` at a free port.

A worker serves both roles whatever pool it was started in (the pool only steers routing),
so the scheduler may lend it to the other pool. `stop()` stops the server, closes the peers'
links and fails what the loop still holds. Whatever hosts it (a Ray actor, a test) asks it
for its address and engine description to register it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import grpc
import torch

from engine.config import EngineBackend, EngineConfig, Role, WorkerOptions
from engine.interface import WorkerEngine
from engine.outputs import EngineInfo
from engine.worker.decode_role import DecodeRole
from engine.worker.loop import EngineLoop
from engine.worker.peers import PrefillPeers, Reroute
from engine.worker.prefill_role import PrefillRole
from engine.worker.servicer import WorkerServicer, start_server


@dataclass
class Worker:
    """A running worker: its engine loop, prefill peers and gRPC server."""

    worker_id: str
    role: Role
    info: EngineInfo
    loop: EngineLoop
    peers: PrefillPeers
    server: grpc.Server
    address: str  # host:port of its gRPC service
    incarnation: str  # new at every start: how the scheduler tells a restarted worker

    def num_used_blocks(self) -> int:
        """KV blocks held right now (the leak check: 0 once every request has ended)."""
        return self.loop.call(lambda engine: engine.stats().num_kv_blocks_used).result(30)

    def num_requests(self) -> int:
        return self.loop.call(lambda engine: engine.num_requests()).result(30)

    def num_prefill_retries(self) -> int:
        """Requests this decode worker moved to another prefill worker after one failed."""
        return self.peers.num_retries

    def stop(self) -> None:
        self.server.stop(grace=1).wait(5)
        self.peers.close()
        self.loop.shutdown()


def build_engine(config: EngineConfig, disaggregated: bool) -> WorkerEngine:
    """The engine config.engine names (disaggregated: it will ship and receive prompt KV)."""
    if config.engine == EngineBackend.VLLM:
        from engine.vllm_backend.engine import VllmEngine
        return VllmEngine(config, disaggregated)
    from engine.engine import Engine
    return Engine(config)


def build_worker(worker_id: str, role: Role, engine_config: EngineConfig, host: str, reroute: Reroute,
                 options: WorkerOptions = WorkerOptions()) -> Worker:
    """A worker serving on host at a free port, its engine loop running."""
    if role not in (Role.PREFILL, Role.DECODE):
        raise ValueError(f"a worker starts in the prefill or the decode pool, not {role!r}")
    engine = build_engine(engine_config, disaggregated=True)
    info = engine.info
    loop = EngineLoop(engine)
    prefill = PrefillRole(loop)
    decode = DecodeRole(loop, options, probe=lambda request_id: peers.progressing(request_id),
                        ended=lambda request_id: peers.forget(request_id))
    peers = PrefillPeers(worker_id, host, decode, info.kv_block_shape, getattr(torch, info.kv_dtype), reroute,
                         options.link_timeout_s, device=info.device, tp_size=info.tensor_parallel_size)
    loop.start()
    incarnation = uuid.uuid4().hex[:12]
    servicer = WorkerServicer(worker_id, incarnation, loop, Role(role), decode, prefill, peers, options.link_timeout_s,
                              info.device)
    server, port = start_server(servicer, host)
    return Worker(worker_id, Role(role), info, loop, peers, server, f"{host}:{port}", incarnation)
