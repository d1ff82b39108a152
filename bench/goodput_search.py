"""DistServe's goodput: the highest request rate at which SLO attainment stays at or above
the target, found by bisection on measured phases.

The search first brackets the answer (doubling the rate from the start while attainment
holds, halving it while it does not), then bisects until the bracket is within `rel_tol`
or `max_phases` phases have run. It is a pure state machine: the caller measures.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class GoodputSearch:
    target_attainment: float
    start_rate: float
    max_phases: int = 8
    rel_tol: float = 0.1
    lo: float | None = None  # highest rate measured at or above the target
    hi: float | None = None  # lowest rate measured below it
    history: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)

    def __post_init__(self) -> None:
        if not 0 < self.start_rate < float("inf"):
            raise ValueError("--find-goodput needs a finite positive starting --request-rate")
        if not 0 < self.target_attainment <= 1:
            raise ValueError("--attainment-target must be in (0, 1]")

    def next_rate(self) -> float | None:
        """The rate to measure next, or None when the search is over."""
        if len(self.history) >= self.max_phases:
            return None
        if self.lo is None and self.hi is None:
            return self.start_rate
        if self.hi is None:
            return self.lo * 2
        if self.lo is None:
            return self.hi / 2
        if (self.hi - self.lo) / self.hi <= self.rel_tol:
            return None
        return (self.lo + self.hi) / 2

    def record(self, rate: float, attainment: float) -> None:
        self.history.append((rate, attainment))
        if attainment >= self.target_attainment:
            self.lo = rate if self.lo is None else max(self.lo, rate)
        else:
            self.hi = rate if self.hi is None else min(self.hi, rate)

    @property
    def done(self) -> bool:
        return self.next_rate() is None

    @property
    def goodput(self) -> float | None:
        """The answer (None when no measured rate met the target)."""
        return self.lo

    def describe(self) -> str:
        if self.lo is None:
            return f"below {self.hi:.3g} req/s (no measured rate met the target)"
        if self.hi is None:
            return f"at least {self.lo:.3g} req/s (every measured rate met the target)"
        return f"{self.lo:.3g} req/s (misses at {self.hi:.3g})"
