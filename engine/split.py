"""Semi-PD's compute split: how one device is shared by its prefill and decode streams.

The split is the prefill share in percent; decode gets the rest. Each stream runs on its
own thread and enters `use(phase)` around every step. How a share becomes hardware:
- CPU: torch intra-op threads, set on the stream's own thread (OpenMP's thread count is
  per calling thread): prefill gets round(share * cores / 100) threads, at least one and
  leaving at least one for decode; decode the remaining cores. With two cores the only
  split is 1 + 1, whatever the share; with one, both streams time-share it.
- CUDA with green contexts (`torch.cuda.green_contexts`): prefill's kernels go to the stream
  of a green context holding its share of the SMs (rounded to the partition granularity),
  created the first time a share is used; decode's go to a high-priority stream of the
  ordinary context, which gets the SMs prefill leaves. (Each `GreenContext.create` splits
  from the whole device, so two contexts made one by one are not known to be disjoint:
  capping one phase is what torch's API can guarantee.)
- CUDA without green contexts: no SM split; decode's stream gets the higher priority, so
  its kernels are scheduled first whenever both streams have work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

PHASES = ("prefill", "decode")
SM_GRANULARITY = 8  # SMs per green-context partition unit on Hopper


class ComputeSplit:
    def __init__(self, device: torch.device, prefill_share: float = 50.0, num_cores: int | None = None):
        self.device = device
        self.num_cores = num_cores or len(os.sched_getaffinity(0))
        self._share = 0.0
        self.set_share(prefill_share)
        self._local = threading.local()
        self._streams: dict[tuple[str, int], torch.cuda.Stream] = {}
        self._contexts: list[object] = []  # green contexts live as long as their streams
        self.mechanism = "threads" if device.type == "cpu" else self._cuda_mechanism()

    @property
    def prefill_share(self) -> float:
        return self._share

    def set_share(self, prefill_share: float) -> None:
        """Takes effect at each stream's next step."""
        if not 0 < prefill_share < 100:
            raise ValueError(f"the prefill share is a percentage strictly between 0 and 100, not {prefill_share}")
        self._share = float(prefill_share)

    @staticmethod
    def other(phase: str) -> str:
        return PHASES[1 - PHASES.index(phase)]

    def share_of(self, phase: str) -> float:
        return self._share if phase == "prefill" else 100.0 - self._share

    def threads(self, phase: str) -> int:
        """CPU: intra-op threads of the phase at the current share."""
        if self.num_cores < 2:
            return 1
        prefill = min(max(round(self._share * self.num_cores / 100), 1), self.num_cores - 1)
        return prefill if phase == "prefill" else self.num_cores - prefill

    def sms(self, phase: str) -> int:
        """CUDA: SMs of the phase's green context at the current share (prefill's is used)."""
        total = torch.cuda.get_device_properties(self.device).multi_processor_count
        units = max(1, round(self.share_of(phase) * total / 100 / SM_GRANULARITY))
        return min(units * SM_GRANULARITY, total - SM_GRANULARITY)

    @contextlib.contextmanager
    def use(self, phase: str) -> Iterator[None]:
        """Runs the enclosed step on the phase's share (call on the phase's own thread)."""
        if self.mechanism == "threads":
            n = self.threads(phase)
            if getattr(self._local, "threads", None) != n:
                torch.set_num_threads(n)
                self._local.threads = n
            yield
            return
        with torch.cuda.stream(self._stream(phase)):
            yield

    def _cuda_mechanism(self) -> str:
        from torch.cuda import green_contexts
        if not green_contexts.SUPPORTED:
            return "stream-priority"
        try:
            self._green_stream(self.sms("prefill"))
            return "green-contexts"
        except Exception as e:  # old driver, MIG, ...: fall back to priorities
            log.warning("green contexts unavailable (%s); semi-PD runs without an SM split, decode first", e)
            return "stream-priority"

    def _stream(self, phase: str) -> torch.cuda.Stream:
        if phase == "prefill" and self.mechanism == "green-contexts":
            return self._green_stream(self.sms(phase))
        key = (phase, 0)
        if key not in self._streams:  # lower number = higher priority
            self._streams[key] = torch.cuda.Stream(self.device, priority=-1 if phase == "decode" else 0)
        return self._streams[key]

    def _green_stream(self, num_sms: int) -> torch.cuda.Stream:
        """The stream of a green context holding num_sms SMs (made once per size)."""
        key = ("prefill", num_sms)
        if key not in self._streams:
            from torch.cuda.green_contexts import GreenContext
            context = GreenContext.create(num_sms=num_sms, device_id=self.device.index or 0)
            self._contexts.append(context)
            self._streams[key] = context.Stream()
        return self._streams[key]
