"""The other ranks of a tensor-parallel engine: processes that rank 0 starts, watches and
starts again.

Ranks 1..N-1 are spawned processes on this machine (on CPU each pinned to its share of the
cores rank 0 may use; on GPU one device each, cuda:r). Each loads only its shard of the
weights, allocates its shard of the same number of KV blocks as rank 0, joins the group
(engine/parallel/group.py) and then runs every step rank 0 broadcasts, until rank 0 stops
it or the group breaks; between steps they take control messages (KV links to join,
transfers to expect: engine/parallel/links.py). Semi-PD adds a stream (`add_stream`): every
rank then runs the prefill stream's steps too, on a thread and a group of their own, over
the same weights and KV cache, on the share of its cores each step names. Rank 0 waits for
them to join while watching that they live: a rank that dies while loading fails the start
with its exit code, not a timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import multiprocessing
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from engine.config import EngineConfig, WorkerOptions
from engine.parallel.group import Control, GroupError, TPGroup, connect
from engine.parallel.kv_link import READ_KV, REPORT, STREAM
from engine.transfer.gloo import listen

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
JOIN_TIMEOUT_S = 300.0  # for every rank to load its shard and join
STOP_TIMEOUT_S = 10.0
POLL_S = 0.05
PHASES = ("decode", "prefill")  # by stream: semi-PD's decode engine drives stream 0


class Ranks:
    def __init__(self, config: EngineConfig, model_path: Path, num_blocks: int, device: torch.device):
        self.config = dataclasses.replace(config, num_kv_blocks=num_blocks)
        self.model_path, self.device = model_path, device
        self.size = config.tensor_parallel_size
        self.procs: list[multiprocessing.Process] = []
        self.num_restarts = 0
        self.num_streams = 1
        self._up = threading.Condition()
        self.groups = self._start()  # one per stream

    @property
    def group(self) -> TPGroup:
        return self.groups[0]

    def _start(self) -> list[TPGroup]:
        ctx = multiprocessing.get_context("spawn")
        port, fd = listen(HOST)
        cores = sorted(os.sched_getaffinity(0))
        for rank in range(1, self.size):
            share = cores[rank * len(cores) // self.size:(rank + 1) * len(cores) // self.size] or cores
            proc = ctx.Process(target=follow, args=(self.config, str(self.model_path), rank, port, share),
                               name=f"pdserve-tp-rank-{rank}", daemon=True)
            proc.start()
            self.procs.append(proc)
        self.store = store = dist.TCPStore(HOST, port, world_size=self.size, is_master=True, wait_for_workers=False,
                                           timeout=timedelta(seconds=JOIN_TIMEOUT_S), master_listen_fd=fd)
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        loaded = [f"loaded-{rank}" for rank in range(1, self.size)]
        while not store.check(loaded):  # each rank sets its key once its shard is loaded
            dead = [p for p in self.procs if not p.is_alive()]
            if dead:
                self._kill()
                raise RuntimeError(f"tensor-parallel {dead[0].name} exited with code {dead[0].exitcode} while starting")
            if time.monotonic() > deadline:
                self._kill()
                raise RuntimeError(f"the tensor-parallel ranks did not join within {JOIN_TIMEOUT_S:g} s")
            time.sleep(POLL_S)
        groups = [connect(HOST, 0, self.size, self.device, store)]
        for stream in range(1, self.num_streams):
            groups.append(self._join_stream(groups[0], stream))
        return groups

    def _join_stream(self, first: TPGroup, stream: int) -> TPGroup:
        first.send_control(STREAM, [stream])
        return connect(HOST, 0, self.size, self.device, self.store, stream)

    def add_stream(self) -> int:
        """Semi-PD: every rank runs a second stream of steps (the prefill engine's); returns its number."""
        self.groups = [*self.groups, self._join_stream(self.groups[0], self.num_streams)]
        self.num_streams += 1
        return self.num_streams - 1

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    @property
    def down(self) -> bool:
        return any(g.broken is not None for g in self.groups) or not self.alive

    def restart(self) -> None:
        log.warning("a tensor-parallel rank is gone: starting ranks 1-%d again", self.size - 1)
        for group in self.groups:
            group.close()
        self._kill()
        groups = self._start()
        with self._up:
            self.groups = groups
            self.num_restarts += 1
            self._up.notify_all()

    def wait_restarted(self) -> None:
        """Another stream's thread: until the engine driving stream 0 has started the ranks again."""
        with self._up:
            if not self._up.wait_for(lambda: not self.down, JOIN_TIMEOUT_S):
                raise GroupError("the tensor-parallel ranks did not start again")

    def report(self) -> list[dict]:
        """What each other rank holds of KV links and transfers (rank 0's loop thread only)."""
        return [json.loads(value) for value in self._ask(REPORT, [], "report")]

    def read_kv(self, block_ids: list[int]) -> list[torch.Tensor]:
        """Each other rank's KV of those blocks, [layers, 2, blocks, block_size, its KV heads,
        head_dim] token-major (rank 0's loop thread only)."""
        from engine.parallel.links import from_bytes
        return [from_bytes(value) for value in self._ask(READ_KV, block_ids, "kv")]

    def _ask(self, kind: int, values: list[int], key: str) -> list[bytes]:
        keys = [f"{key}-{rank}" for rank in range(1, self.size)]
        for k in keys:
            self.store.delete_key(k)
        self.group.send_control(kind, values)
        self.store.wait(keys, timedelta(seconds=STOP_TIMEOUT_S))
        return [self.store.get(k) for k in keys]

    def stop(self) -> None:
        for group in self.groups:
            if group.broken is None:
                try:
                    group.send_stop()
                except GroupError:
                    pass
            group.close()
        for proc in self.procs:
            proc.join(STOP_TIMEOUT_S)
        self._kill()

    def _kill(self) -> None:
        for proc in self.procs:
            if proc.is_alive():
                proc.kill()
            proc.join(STOP_TIMEOUT_S)
        self.procs = []


def follow(config: EngineConfig, model_path: str, rank: int, port: int, cores: list[int]) -> None:
    """A rank's process: its shard, then every step rank 0 sends, until it says stop."""
    from engine.parallel.links import RankLinks
    from engine.runner import ModelRunner, resolve_device
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cores)
    if resolve_device(config.device).type == "cuda":
        torch.cuda.set_device(rank)  # one device per rank
    runner = ModelRunner(config, Path(model_path), tp_rank=rank)
    device = runner.device if runner.device.type != "cuda" else torch.device("cuda", torch.cuda.current_device())
    store = dist.TCPStore(HOST, port, world_size=config.tensor_parallel_size, is_master=False,
                          timeout=timedelta(seconds=JOIN_TIMEOUT_S))
    store.set(f"loaded-{rank}", "1")
    runner.tp = connect(HOST, rank, config.tensor_parallel_size, device, store)
    links = RankLinks(runner, rank, store, WorkerOptions.link_timeout_s)
    streams: list[threading.Thread] = []

    def join_stream(stream: int) -> None:
        from engine.split import ComputeSplit
        sibling = runner.share(ComputeSplit(runner.device, 50.0, len(cores)), PHASES[0])
        sibling.tp = connect(HOST, rank, config.tensor_parallel_size, device, store, stream)
        streams.append(threading.Thread(target=run_steps, args=(sibling, None, None), daemon=True))
        streams[-1].start()

    run_steps(runner, links, join_stream)
    for thread in streams:
        thread.join(STOP_TIMEOUT_S)
    logging.shutdown()
    os._exit(0)  # now: KV links' threads may sit in gloo receives, which tearing down the interpreter would abort


def run_steps(runner, links, join_stream) -> None:
    """One stream's steps on a rank, until rank 0 stops it; the first stream also takes the
    control messages."""
    with torch.inference_mode():
        while (msg := runner.tp.recv_step(runner.block_size)) is not None:
            if isinstance(msg, Control):
                if msg.kind == STREAM:
                    join_stream(msg.values[0])
                else:
                    links.control(msg)
                continue
            split = runner.split
            if split is not None:
                split.set_share(msg.prefill_share)
            with split.use(runner.phase) if split is not None else contextlib.nullcontext():
                runner.forward(msg.input_ids, msg.positions, msg.layout, links.exporter(msg.runs) if links else None)
