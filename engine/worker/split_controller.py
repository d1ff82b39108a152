"""Semi-PD's SLO-aware controller of the prefill/decode split (TECHNIQUES.md; no torch).

Every window it is given the window's TTFTs and TPOTs, the arrival rate and l100 (one
request's prefill time at the whole device), and compares their percentile with the SLOs:
- TTFT misses and TPOT meets: raise the prefill share x by `step` until the TTFT model says
  it meets, at most `max_step` steps (and never past `max_share`);
- TPOT misses and TTFT meets: raise the decode share y = 100 - x the same way;
- both miss: hold (one phase's gain is the other's loss); both meet: hold.
Models, refitted by least squares over the recent windows:
  TTFT(x) = a1 / (x - beta) + b1,  beta = 100 * rate * l100 (the share that only keeps up)
  TPOT(y) = a2 / y + b2
With a single distinct point (or a fit that is not decreasing in the share) b is taken as 0,
i.e. latency inversely proportional to the share left over.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SplitControllerConfig:
    window: int = 200
    """Decode steps per decision."""
    step: float = 5.0
    """Share points one step moves."""
    max_step: int = 4
    """Most steps one decision moves."""
    min_share: float = 10.0
    """Lowest prefill share in percent (the decode share is 100 minus it)."""
    max_share: float = 90.0
    """Highest prefill share in percent."""
    quantile: float = 0.9
    """Percentile of TTFT and TPOT compared with the SLOs."""
    min_samples: int = 4
    """Finished requests a window needs before it decides."""
    history: int = 8
    """Windows the latency models are fitted on."""

    def __post_init__(self) -> None:
        if not 0 < self.min_share <= self.max_share < 100:
            raise ValueError("the share bounds must satisfy 0 < min_share <= max_share < 100")
        if self.window < 1 or self.step <= 0 or self.max_step < 1 or not 0 < self.quantile <= 1:
            raise ValueError("window and max_step must be >= 1, step positive, quantile in (0, 1]")


@dataclass(frozen=True)
class WindowStats:
    """What one window measured."""

    ttft_s: Sequence[float]
    tpot_s: Sequence[float]
    rate: float = 0.0            # requests per second that arrived in the window
    prefill_s_full: float = 0.0  # l100: mean prefill time of one request at a 100 % share


@dataclass(frozen=True)
class SplitDecision:
    verdict: str  # ok | need-prefill | need-decode | both-miss | few-samples
    share: float  # the prefill share from now on
    ttft_s: float | None = None  # the window's percentile TTFT and TPOT
    tpot_s: float | None = None


class InverseModel:
    """latency = a / u + b in a share u, fitted on (u, latency) points."""

    def __init__(self, history: int):
        self.points: deque[tuple[float, float]] = deque(maxlen=history)
        self.a, self.b = 0.0, 0.0

    def add(self, u: float, latency: float) -> None:
        if u > 0:
            self.points.append((u, latency))
            self._fit()

    def _fit(self) -> None:
        f = [1 / u for u, _ in self.points]
        t = [lat for _, lat in self.points]
        n = len(f)
        mean_f, mean_t = sum(f) / n, sum(t) / n
        var = sum((fi - mean_f) ** 2 for fi in f)
        if var > 1e-12:
            a = sum((fi - mean_f) * (ti - mean_t) for fi, ti in zip(f, t)) / var
            b = mean_t - a * mean_f
            if a > 0 and b >= 0:
                self.a, self.b = a, b
                return
        self.a, self.b = sum(fi * ti for fi, ti in zip(f, t)) / sum(fi * fi for fi in f), 0.0

    def predict(self, u: float) -> float:
        return math.inf if u <= 0 else self.a / u + self.b


class SplitController:
    def __init__(self, slo_ttft_s: float, slo_tpot_s: float, config: SplitControllerConfig = SplitControllerConfig(),
                 share: float = 50.0):
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.config = config
        self.share = min(max(share, config.min_share), config.max_share)
        self.ttft_model = InverseModel(config.history)  # u = x - beta
        self.tpot_model = InverseModel(config.history)  # u = y
        self.last = SplitDecision("few-samples", self.share)

    def update(self, window: WindowStats) -> SplitDecision:
        cfg = self.config
        if len(window.ttft_s) < cfg.min_samples:
            self.last = SplitDecision("few-samples", self.share)
            return self.last
        ttft = float(np.quantile(window.ttft_s, cfg.quantile))
        tpot = float(np.quantile(window.tpot_s, cfg.quantile)) if window.tpot_s else None
        beta = 100 * window.rate * window.prefill_s_full
        x, y = self.share, 100 - self.share
        self.ttft_model.add(x - beta, ttft)
        if tpot is not None:
            self.tpot_model.add(y, tpot)
        ttft_miss = ttft > self.slo_ttft_s
        tpot_miss = tpot is not None and tpot > self.slo_tpot_s
        if ttft_miss and tpot_miss:
            verdict = "both-miss"
        elif ttft_miss:
            verdict = "need-prefill"
            self.share = self._raise(x, cfg.max_share, lambda s: self.ttft_model.predict(s - beta) <= self.slo_ttft_s)
        elif tpot_miss:
            verdict = "need-decode"
            self.share = 100 - self._raise(y, 100 - cfg.min_share,
                                           lambda s: self.tpot_model.predict(s) <= self.slo_tpot_s)
        else:
            verdict = "ok"
        self.last = SplitDecision(verdict, self.share, ttft, tpot)
        return self.last

    def _raise(self, share: float, bound: float, meets) -> float:
        """The smallest share + k * step (k = 1..max_step, at most bound) the model says meets
        the SLO; the largest step allowed when none does."""
        candidate = share
        for k in range(1, self.config.max_step + 1):
            candidate = min(share + k * self.config.step, bound)
            if meets(candidate) or candidate >= bound:
                break
        return max(candidate, share)
