"""Load-test metric arithmetic over per-request records (definitions: shared/TECHNIQUES.md).

- TTFT: first streamed content chunk minus send time (client side).
- TPOT (per request): (e2el - ttft) / (output_tokens - 1); a 1-token request has none.
- ITL: gaps between consecutive chunks, pooled over all requests.
- E2EL: send to last chunk.
- Attainment: share of successful requests meeting every given SLO jointly.
- Goodput: requests meeting every SLO per second of benchmark duration (the `--goodput`
  convention); DistServe's goodput (highest rate at target attainment) is found by sweeping.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class RequestRecord:
    """What the client saw of one request; times in seconds from the benchmark start."""

    send_s: float
    chunk_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    ok: bool = True
    error: str | None = None
    timings: dict[str, float] | None = None  # per-phase seconds, when the server reports them
    index: int = -1  # the request's position in the workload

    @property
    def ttft_s(self) -> float | None:
        return self.chunk_s[0] - self.send_s if self.ok and self.chunk_s else None

    @property
    def e2el_s(self) -> float | None:
        return self.chunk_s[-1] - self.send_s if self.ok and self.chunk_s else None

    @property
    def tpot_s(self) -> float | None:
        if not self.ok or self.output_tokens < 2 or not self.chunk_s:
            return None
        return (self.e2el_s - self.ttft_s) / (self.output_tokens - 1)

    @property
    def itl_s(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_s, self.chunk_s[1:])] if self.ok else []


@dataclass(frozen=True)
class SLO:
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    def met(self, r: RequestRecord) -> bool:
        """Every given SLO at once; a request without a TPOT (one token) meets any TPOT SLO."""
        if not r.ok:
            return False
        checks = ((self.ttft_ms, r.ttft_s), (self.tpot_ms, r.tpot_s), (self.e2el_ms, r.e2el_s))
        return all(limit is None or value is None or value * 1000 <= limit for limit, value in checks)

    def attainment(self, records: list[RequestRecord]) -> float | None:
        """Share of all records (failures count against it) meeting every SLO; None without
        SLOs or records."""
        if self.empty or not records:
            return None
        return sum(1 for r in records if self.met(r)) / len(records)


def percentile(values: list[float], q: float) -> float | None:
    """numpy's (linear) percentile, q in [0, 100], as the servers' controllers compute theirs;
    None for no values."""
    return float(np.percentile(values, q)) if values else None


@dataclass(frozen=True)
class Summary:
    mean: float | None
    median: float | None
    p90: float | None
    p99: float | None
    max: float | None = None

    @classmethod
    def of(cls, values: list[float]) -> "Summary":
        if not values:
            return cls(None, None, None, None)
        return cls(sum(values) / len(values), percentile(values, 50), percentile(values, 90), percentile(values, 99),
                   max(values))


@dataclass(frozen=True)
class Report:
    num_ok: int
    num_failed: int
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    ttft_s: Summary
    tpot_s: Summary
    itl_s: Summary
    e2el_s: Summary
    attainment: float | None
    goodput_rps: float | None


def summarize(records: list[RequestRecord], duration_s: float, slo: SLO = SLO()) -> Report:
    ok = [r for r in records if r.ok]
    met = sum(1 for r in ok if slo.met(r))  # failed requests do not meet any SLO
    return Report(
        num_ok=len(ok), num_failed=len(records) - len(ok), duration_s=duration_s,
        request_throughput=len(ok) / duration_s if duration_s > 0 else 0.0,
        output_token_throughput=sum(r.output_tokens for r in ok) / duration_s if duration_s > 0 else 0.0,
        ttft_s=Summary.of([r.ttft_s for r in ok if r.ttft_s is not None]),
        tpot_s=Summary.of([r.tpot_s for r in ok if r.tpot_s is not None]),
        itl_s=Summary.of([gap for r in ok for gap in r.itl_s]),
        e2el_s=Summary.of([r.e2el_s for r in ok if r.e2el_s is not None]),
        attainment=slo.attainment(records),
        goodput_rps=None if slo.empty or duration_s <= 0 else met / duration_s,
    )
