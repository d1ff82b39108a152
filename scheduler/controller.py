"""The online role controller: moves workers between the prefill and decode pools from the
windowed percentile TTFT and TPOT against the SLOs.

Pure: `RoleController.decide` takes one window's latency samples and the pools' loads and
returns a `Decision`; the global scheduler applies it to its view (the worker keeps running
what it has and gets new work of its new role). Rules, per window:
- too few samples: hold, and carry them into the next window; a decision looks at up to
  `max_windows` windows so that low rates still reach `min_samples` (a quiet spell neither
  extends nor breaks a streak; one that outlasts `max_windows` ends it);
- TTFT misses and TPOT has slack (p-quantile below `slack` x its SLO): the verdict wants a
  prefill worker; TPOT misses and TTFT has slack: a decode worker; both miss, or both meet:
  hold (moving a worker would hurt the phase that also misses);
- hysteresis: act only after `patience` windows in a row with the same verdict, and not in
  the `cooldown` windows after a move; never leave a pool with fewer than `min_per_pool`
  live workers. The donor is the least loaded live worker of the other pool.
No Ray, no torch, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import numpy as np

from scheduler.policies import WorkerLoad


@dataclass(frozen=True)
class ControllerConfig:
    window_s: float = 20.0
    """Seconds of finished requests per decision."""
    quantile: float = 0.9
    """Percentile of TTFT and TPOT compared with the SLOs."""
    min_samples: int = 10
    """Fewer finished requests than this (over up to max_windows windows): hold."""
    max_windows: int = 4
    """Windows a decision may pool when each alone has fewer than min_samples."""
    patience: int = 2
    """Windows in a row with the same verdict before a worker moves."""
    cooldown: int = 2
    """Windows after a move before the next one."""
    slack: float = 0.8
    """The donor phase's percentile must be below this fraction of its SLO."""
    min_per_pool: int = 1
    """Workers a pool keeps at least."""

    def __post_init__(self) -> None:
        if self.window_s <= 0 or not 0 < self.quantile <= 1 or self.min_samples < 1 or self.max_windows < 1:
            raise ValueError("--controller-window-s must be positive, --controller-quantile in (0, 1], "
                             "--controller-min-samples and --controller-max-windows at least 1")


@dataclass(frozen=True)
class Decision:
    verdict: str  # few-samples | ok | both-miss | need-prefill | need-decode
    ttft_s: float | None = None
    tpot_s: float | None = None
    move: tuple[str, str] | None = None  # (worker id, the pool it joins)


class RoleController:
    def __init__(self, slo_ttft_s: float, slo_tpot_s: float, config: ControllerConfig = ControllerConfig()):
        if config.min_samples < 1 or config.max_windows < 1 or config.patience < 1:
            raise ValueError("min_samples, max_windows and patience must be at least 1")
        self.slo_ttft_s, self.slo_tpot_s, self.config = slo_ttft_s, slo_tpot_s, config
        self._streak: tuple[str, int] = ("", 0)
        self._cooldown = 0
        self._held: list[tuple[Sequence[float], Sequence[float]]] = []  # recent windows still too few

    def decide(self, ttfts: Sequence[float], tpots: Sequence[float], prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad]) -> Decision:
        c = self.config
        self._cooldown = max(0, self._cooldown - 1)
        self._held.append((ttfts, tpots))
        ttfts = list(chain.from_iterable(t for t, _ in self._held))
        tpots = list(chain.from_iterable(t for _, t in self._held))
        if len(ttfts) < c.min_samples:
            if len(self._held) >= c.max_windows:  # quiet for too long: start over
                self._held.pop(0)
                self._streak = ("", 0)
            return Decision("few-samples")
        self._held = []
        ttft = float(np.quantile(ttfts, c.quantile))
        tpot = float(np.quantile(tpots, c.quantile)) if tpots else 0.0
        ttft_miss, tpot_miss = ttft > self.slo_ttft_s, tpot > self.slo_tpot_s
        if ttft_miss and tpot <= c.slack * self.slo_tpot_s:
            verdict = "need-prefill"
        elif tpot_miss and ttft <= c.slack * self.slo_ttft_s:
            verdict = "need-decode"
        else:
            verdict = "both-miss" if ttft_miss and tpot_miss else "ok"
        streak = self._streak[1] + 1 if self._streak[0] == verdict else 1
        self._streak = (verdict, streak)
        if verdict not in ("need-prefill", "need-decode") or streak < c.patience or self._cooldown:
            return Decision(verdict, ttft, tpot)
        donors, to = (decode, "prefill") if verdict == "need-prefill" else (prefill, "decode")
        live = [w for w in donors if w.alive]
        if len(live) <= c.min_per_pool:
            return Decision(verdict, ttft, tpot)
        donor = min(live, key=lambda w: (w.queue, w.pending_prefill_tokens, w.worker_id))
        self._streak, self._cooldown = ("", 0), c.cooldown + 1
        return Decision(verdict, ttft, tpot, (donor.worker_id, to))
