"""The process environment a vLLM engine needs for speed on CPU, set where a worker process
starts (a Ray actor's runtime_env): vLLM gives it only to the processes it spawns itself
(`vllm/platforms/cpu.py`), and ours runs the engine in the worker's own process.

torch's libgomp and vLLM's tcmalloc preloaded (without the former only one core is used
when threads are bound), the OpenMP thread count, and the cores OpenMP binds its threads to
(vLLM's multiprocess executor sets the same OMP_PLACES / OMP_PROC_BIND for its workers).
Torch-free: found by path, not imported.
"""

from __future__ import annotations

import glob
import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def preload_libraries() -> list[str]:
    found = []
    vllm, torch = _package_dir("vllm"), _package_dir("torch")
    if vllm is not None:
        found += sorted(glob.glob(str(vllm / "libs" / "libtcmalloc_minimal*.so*")))[:1]
    if torch is not None:
        found += sorted(glob.glob(str(torch / "lib" / "libgomp*.so*")) +
                        glob.glob(str(torch.parent / "torch.libs" / "libgomp*.so*")))[:1]
    return found


def worker_env(num_threads: int, cores: list[int] | None = None, cpu: bool = True) -> dict[str, str]:
    """Environment variables of a process that will run one vLLM engine in-process."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    if not cpu:
        return env
    env["OMP_NUM_THREADS"] = str(num_threads)
    if preload := preload_libraries():
        env["LD_PRELOAD"] = ":".join(preload)
    if cores:
        env["OMP_PLACES"] = "{" + ",".join(str(c) for c in cores) + "}"
        env["OMP_PROC_BIND"] = "true"
    return env
