"""A worker as a Ray actor: one engine on one device, both roles, one gRPC service.

The actor builds its engine and both roles (prefill: ships prompt KV; decode: owns requests
and pulls KV from prefill peers, or prefills them itself), serves the Worker gRPC service on
its node's address and registers with the global scheduler under its pool (`role`). The
pool only steers routing: the mixed-pool policy lends a worker to the other pool, the role
controller moves it there, conditional disaggregation prefills on a decode worker. Ray restarts it when its process dies (the cluster
creates it with max_restarts=-1): the constructor runs again, serves at a new port under a
new incarnation and registers again, which is how a restarted worker rejoins.
Requests never travel through Ray: only the registry does. (Ray is imported lazily here and
in scheduler/cluster.py: its node address is fixed when it is first imported, after
`Cluster.start` has asked for loopback.)
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass

from engine.config import EngineConfig
from scheduler.global_scheduler import WorkerInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerOptions:
    """Role settings that are not the engine's."""

    max_pending: int = 64
    transfer_timeout_s: float = 30.0
    link_timeout_s: float = 30.0


class WorkerActor:
    def __init__(self, worker_id: str, role: str, engine_config: EngineConfig, scheduler,
                 options: WorkerOptions = WorkerOptions()):
        from engine.decode_role import DecodeRole
        from engine.engine import Engine
        from engine.prefill_client import PrefillClient
        from engine.prefill_role import PrefillRole
        from engine.server import WorkerService, start_server
        from engine.worker import EngineWorker
        import ray

        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {worker_id}: %(message)s")
        self.worker_id, self.role, self.scheduler = worker_id, role, scheduler
        host = ray.util.get_node_ip_address()
        engine = Engine(engine_config)
        self.worker = EngineWorker(engine)
        if role not in ("prefill", "decode"):
            raise ValueError(f"a worker actor starts in the prefill or the decode pool, not {role!r}")
        prefill = PrefillRole(self.worker)
        decode = DecodeRole(self.worker, options.max_pending, options.transfer_timeout_s,
                            probe=lambda request_id: self.links.progressing(request_id))
        cfg = engine.model_config
        self.links = links = PrefillClient(
            worker_id, host, decode, (engine_config.block_size, cfg.num_kv_heads, cfg.head_dim),
            engine.runner.kv_cache.tensor.dtype, self._reroute, options.link_timeout_s, device=engine.runner.device)
        self.worker.start()
        incarnation = uuid.uuid4().hex[:12]
        self.service = WorkerService(worker_id, incarnation, self.worker, role, decode, prefill, links,
                                     options.link_timeout_s, str(engine.runner.device))
        self.server, port = start_server(self.service, host)
        self.info = WorkerInfo(worker_id, role, f"{host}:{port}", incarnation, os.getpid(), engine.max_model_len,
                               engine.model_config.vocab_size, engine_config.block_size, engine.num_kv_blocks)
        ray.get(scheduler.register.remote(self.info))

    def describe(self) -> WorkerInfo:
        return self.info

    def num_used_blocks(self) -> int:
        """KV blocks held right now (the leak check: 0 once every request has ended)."""
        return self.worker.call(lambda engine: engine.kv.num_used_blocks).result(30)

    def num_requests(self) -> int:
        return self.worker.call(lambda engine: len(engine.requests)).result(30)

    def num_prefill_retries(self) -> int:
        """Requests this decode worker moved to another prefill worker after one failed."""
        return self.links.num_retries

    def stop(self) -> None:
        self.server.stop(grace=1).wait(5)
        self.links.close()
        self.worker.shutdown()

    def _reroute(self, failed: list[tuple[str, str]]) -> tuple[str, str] | None:
        import ray
        return ray.get(self.scheduler.reroute_prefill.remote(failed), timeout=10)
