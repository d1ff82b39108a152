"""A worker as a Ray actor: the Ray side of one worker (engine/worker/build.py builds it).

The actor builds its worker on its node's address and registers it with the global
scheduler under its pool (`role`). The pool only steers routing: the mixed-pool policy lends
a worker to the other pool, the role controller moves it there, conditional disaggregation
prefills on a decode worker. Ray restarts the actor when its process dies (the cluster
creates it with max_restarts=-1): the constructor runs again, serves at a new port under a
new incarnation and registers again, which is how a restarted worker rejoins. When one of
its prefill peers fails, the worker asks the scheduler (through this actor) where to
reroute. Requests never travel through Ray: only the registry does. (Ray is imported lazily
here and in scheduler/cluster.py: its node address is fixed when it is first imported,
after `Cluster.start` has asked for loopback.)
"""

from __future__ import annotations

import logging
import os

from engine.config import EngineConfig, Role, WorkerOptions
from scheduler.global_scheduler import WorkerInfo

log = logging.getLogger(__name__)


class WorkerActor:
    def __init__(self, worker_id: str, role: Role, engine_config: EngineConfig, scheduler,
                 options: WorkerOptions = WorkerOptions()):
        import ray

        from engine.worker.build import build_worker

        logging.basicConfig(level=logging.INFO, format=f"%(asctime)s %(levelname)s {worker_id}: %(message)s")
        self.worker_id, self.scheduler = worker_id, scheduler
        self.worker = build_worker(worker_id, role, engine_config, ray.util.get_node_ip_address(), self._reroute,
                                   options)
        w, info = self.worker, self.worker.info
        self.info = WorkerInfo(worker_id, w.role, w.address, w.incarnation, os.getpid(), info.max_model_len,
                               info.vocab_size, info.block_size, info.num_kv_blocks,
                               w.loop.stats().kv_prediction_cost)
        ray.get(scheduler.register.remote(self.info))

    def describe(self) -> WorkerInfo:
        return self.info

    def num_used_blocks(self) -> int:
        """KV blocks held right now (the leak check: 0 once every request has ended)."""
        return self.worker.num_used_blocks()

    def num_requests(self) -> int:
        return self.worker.num_requests()

    def num_prefill_retries(self) -> int:
        """Requests this decode worker moved to another prefill worker after one failed."""
        return self.worker.num_prefill_retries()

    def stop(self) -> None:
        self.worker.stop()

    def _reroute(self, failed: list[tuple[str, str]]) -> tuple[str, str] | None:
        import ray
        return ray.get(self.scheduler.reroute_prefill.remote(failed), timeout=10)
