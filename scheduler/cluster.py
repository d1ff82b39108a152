"""Ray start/connect, the global scheduler actor, and the worker actors in a placement group.

`Cluster.start()` joins the Ray cluster at `ray_address`, or starts an embedded one on this
machine (loopback only, no dashboard, no token auth files), then creates the global
scheduler and one actor per worker. Each worker gets a placement group of one bundle per
tensor-parallel rank (`--prefill-tp`, `--decode-tp`), packed on one node: one GPU per rank
when Ray has GPUs, otherwise a share of the CPU cores (its torch threads), so workers and
ranks do not fight over cores. The actor is the worker's first rank, in its first bundle;
it starts the other ranks itself, on the cores the other bundles hold. On an embedded cluster the workers share this machine's memory
budget (`--memory-budget auto`) evenly; prefill workers keep no packed-GEMM copies unless
they may be lent to decode. vLLM workers (`--engine vllm`) get the OpenMP set-up vLLM's
CPU backend needs in their process environment, bound to cores of their own on this
machine. Workers restart when their process dies and register again.
On a Ray cluster whose nodes advertise the custom resources `pdserve_prefill` or
`pdserve_decode` (the Helm chart's worker groups do), each worker's bundle also asks for one
unit of its pool's resource, so prefill workers land on prefill nodes and decode workers on
decode nodes. `stop()` kills the actors, removes the placement group and, if it started Ray,
stops it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, replace

from engine.config import EngineBackend, EngineConfig, Role, WorkerOptions
from engine.memory import auto_budget
from engine.vllm_backend.process_env import worker_env
from scheduler.controller import RoleController
from scheduler.global_scheduler import GlobalScheduler, WorkerInfo
from scheduler.policies import DEFAULT_POLICY, PolicyConfig
from scheduler.worker_actor import WorkerActor

log = logging.getLogger(__name__)

# Ray would otherwise bind the node to the machine's external address and write a token file
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
# custom Ray resources a node may advertise to host one pool's workers (deploy/helm sets them)
POOL_RESOURCE = {Role.PREFILL: "pdserve_prefill", Role.DECODE: "pdserve_decode"}


@dataclass(frozen=True)
class ClusterSpec:
    num_prefill: int = 1
    num_decode: int = 1
    ray_address: str | None = None
    policy: str = DEFAULT_POLICY
    worker: WorkerOptions = WorkerOptions()
    start_timeout_s: float = 600.0
    policy_config: PolicyConfig = PolicyConfig()
    controller: RoleController | None = None
    prefill_tp: int = 1  # tensor-parallel ranks of each prefill worker
    decode_tp: int = 1


class Cluster:
    def __init__(self, spec: ClusterSpec, engine_config: EngineConfig):
        if spec.num_prefill < 1 or spec.num_decode < 1:
            raise ValueError("disaggregated serving needs at least one prefill and one decode worker")
        self.spec, self.engine_config = spec, engine_config
        self.scheduler = None
        self.workers: dict[str, object] = {}  # worker id -> actor handle
        self._pgs: list = []
        self._owns_ray = False

    def start(self) -> "Cluster":
        if not self.spec.ray_address:  # must precede Ray's first import in this process
            for key, value in LOOPBACK_ENV.items():
                os.environ.setdefault(key, value)
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        spec = self.spec
        num_workers = spec.num_prefill + spec.num_decode
        roles = ([(Role.PREFILL, i, spec.prefill_tp) for i in range(spec.num_prefill)]
                 + [(Role.DECODE, i, spec.decode_tp) for i in range(spec.num_decode)])
        num_ranks = sum(tp for _, _, tp in roles)
        threads = self.engine_config.num_threads or max(1, (os.cpu_count() or 1) // num_ranks)  # per rank
        if not ray.is_initialized():
            if spec.ray_address:
                ray.init(address=spec.ray_address, log_to_driver=True)
            else:
                ray.init(num_cpus=max(os.cpu_count() or 1, threads * num_ranks), include_dashboard=False,
                         log_to_driver=True)
                self._owns_ray = True
                if ray.util.get_node_ip_address() != "127.0.0.1":
                    log.warning("Ray was imported before pdserve could ask for loopback: workers listen on %s",
                                ray.util.get_node_ip_address())
        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 and self.engine_config.device in ("auto", "cuda")
        if use_gpu and gpus < num_ranks:
            raise ValueError(f"{num_workers} workers of {num_ranks} ranks need {num_ranks} GPUs; the Ray cluster has {gpus}")
        if use_gpu and max(spec.prefill_tp, spec.decode_tp) > 1:
            raise ValueError("tensor-parallel workers under Ray run on CPU for now: a worker's other ranks do not see "
                             "the GPUs of their bundles (serve one GPU per worker, or --mode colocated)")
        bundle = {"GPU": 1, "CPU": 1} if use_gpu else {"CPU": threads}
        pools = ray.cluster_resources()
        for role, _, tp in roles:
            ranks = [dict(bundle, **({POOL_RESOURCE[role]: 1} if POOL_RESOURCE[role] in pools else {}))] * tp
            self._pgs.append(placement_group(ranks, strategy="STRICT_PACK"))
        wait_s = spec.start_timeout_s if spec.ray_address else 30.0  # an external cluster may scale up
        try:
            ray.get([pg.ready() for pg in self._pgs], timeout=wait_s)
        except ray.exceptions.GetTimeoutError:
            free = ray.available_resources()
            self.stop()
            raise RuntimeError(f"Ray could not place {num_ranks} ranks of {bundle} within {wait_s:g} s "
                               f"(available: {free.get('CPU', 0):g} CPU, {free.get('GPU', 0):g} GPU)") from None
        self.scheduler = ray.remote(GlobalScheduler).options(num_cpus=0).remote(
            spec.policy, policy_config=spec.policy_config, controller=spec.controller)
        vllm = self.engine_config.engine == EngineBackend.VLLM
        worker_config = replace(self.engine_config, device="cuda" if use_gpu else self.engine_config.device)
        if not vllm:
            if worker_config.memory_budget_bytes is None and not spec.ray_address:  # this machine's, shared by the ranks
                worker_config = replace(worker_config, memory_budget=str(auto_budget(num_ranks)))
        actor = ray.remote(WorkerActor)
        first_core = 0
        for (role, i, tp), pg in zip(roles, self._pgs):
            worker_id = f"{role}-{i}"
            config, runtime_env = replace(worker_config, tensor_parallel_size=tp), None
            if not vllm:  # shared by its ranks
                config = replace(config, num_threads=None if use_gpu else threads * tp,
                                 memory_budget=str(config.memory_budget_bytes * tp) if config.memory_budget_bytes
                                 else config.memory_budget)
            if vllm:  # its threads set up at process start; on one machine, each worker on cores of its own
                cores = (None if spec.ray_address or use_gpu
                         else [(first_core + c) % (os.cpu_count() or 1) for c in range(threads)])
                runtime_env = {"env_vars": worker_env(threads, cores, cpu=not use_gpu)}
            first_core += threads * tp
            self.workers[worker_id] = actor.options(runtime_env=runtime_env,
                name=None, num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), max_restarts=-1,
                max_task_retries=0, max_concurrency=4,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0),
            ).remote(worker_id, role, config, self.scheduler, spec.worker)
        started = time.monotonic()
        ray.get([w.describe.remote() for w in self.workers.values()], timeout=spec.start_timeout_s)
        log.info("%d prefill workers of %d ranks and %d decode workers of %d ranks up in %.1f s (%s)",
                 spec.num_prefill, spec.prefill_tp, spec.num_decode, spec.decode_tp, time.monotonic() - started,
                 "one GPU per rank" if use_gpu else f"{threads} CPU threads per rank")
        return self

    def limits(self) -> tuple[int, int]:
        """(max_model_len, vocab_size) of the served model."""
        import ray
        return ray.get(self.scheduler.model_limits.remote())

    def describe(self) -> list[WorkerInfo]:
        import ray
        return ray.get([w.describe.remote() for w in self.workers.values()])

    def stop(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if not ray.is_initialized():
            return
        for handle in self.workers.values():
            try:
                ray.get(handle.stop.remote(), timeout=10)
            except Exception:
                pass  # dead or restarting: killed below
            ray.kill(handle, no_restart=True)
        self.workers.clear()
        if self.scheduler is not None:
            ray.kill(self.scheduler)
            self.scheduler = None
        for pg in self._pgs:
            remove_placement_group(pg)
        self._pgs = []
        if self._owns_ray:
            ray.shutdown()
