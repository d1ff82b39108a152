"""How much memory an engine may hold, and what it spends it on.

`--memory-budget auto` is a share of the memory available when the process starts: the
smaller of the machine's available memory and what its cgroup (a container's limit) leaves.
A local cluster divides its budget evenly among the workers it starts on this machine. From
the budget the runner derives, when they are left on auto, whether it keeps a CPU packed
copy of the weights (about PACK_COPY_FACTOR times the weights it copies, measured) and the KV
cache (what is left once the weights and the copy are resident, at most AUTO_KV_MAX_BYTES).
Torch-free.
"""

from __future__ import annotations

import os
from pathlib import Path

AUTO_SHARE = 0.7  # of the memory available at start
AUTO_KV_MAX_BYTES = 1 << 30
PACK_COPY_FACTOR = 1.05  # resident bytes of the oneDNN-packed copy per weight byte it copies (1.03 measured)


def available_bytes() -> int:
    """Memory this process could still take: MemAvailable, and no more than the cgroup's
    limit minus its usage where one is set."""
    avail = _meminfo_available()
    limit = _cgroup_room()
    return min(avail, limit) if limit is not None else avail


def auto_budget(num_workers: int = 1) -> int:
    return int(available_bytes() * AUTO_SHARE / max(1, num_workers))


def process_rss() -> int:
    """Resident bytes of this process."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import psutil
        return psutil.Process().memory_info().rss


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil
    return psutil.virtual_memory().available


def _cgroup_room() -> int | None:
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:  # no limit
            return None
        return max(0, int(limit) - usage)
    return None
