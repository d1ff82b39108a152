"""The online role controller: moves workers between the prefill and decode pools from the
windowed percentile TTFT and TPOT against the SLOs.

Pure: `RoleController.decide` takes one window's latency samples and the pools' loads and
returns a `Decision`; the global scheduler applies it to its view (the worker keeps running
what it has and gets new work of its new role). Rules, per window:
- too few samples: hold;
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

from scheduler.policies import WorkerLoad


@dataclass(frozen=True)
class ControllerConfig:
    window_s: float = 20.0
    """Seconds of finished requests per decision."""
    quantile: float = 0.9
    """Percentile of TTFT and TPOT compared with the SLOs."""
    min_samples: int = 10
    """Fewer finished requests in a window than this: hold."""
    patience: int = 2
    """Windows in a row with the same verdict before a worker moves."""
    cooldown: int = 2
    """Windows after a move before the next one."""
    slack: float = 0.8
    """The donor phase's percentile must be below this fraction of its SLO."""
    min_per_pool: int = 1
    """Workers a pool keeps at least."""


@dataclass(frozen=True)
class Decision:
    verdict: str  # few-samples | ok | both-miss | need-prefill | need-decode
    ttft_s: float | None = None
    tpot_s: float | None = None
    move: tuple[str, str] | None = None  # (worker id, the pool it joins)


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (numpy's default)."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


class RoleController:
    def __init__(self, slo_ttft_s: float, slo_tpot_s: float, config: ControllerConfig = ControllerConfig()):
        self.slo_ttft_s, self.slo_tpot_s, self.config = slo_ttft_s, slo_tpot_s, config
        self._streak: tuple[str, int] = ("", 0)
        self._cooldown = 0

    def decide(self, ttfts: Sequence[float], tpots: Sequence[float], prefill: Sequence[WorkerLoad],
               decode: Sequence[WorkerLoad]) -> Decision:
        c = self.config
        self._cooldown = max(0, self._cooldown - 1)
        if len(ttfts) < c.min_samples:
            self._streak = ("", 0)
            return Decision("few-samples")
        ttft = quantile(ttfts, c.quantile)
        tpot = quantile(tpots, c.quantile) if tpots else 0.0
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
