"""PNG figures of a benchmark run (matplotlib, no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from bench.report import PhaseResult, rate_label  # noqa: E402

PHASE_ORDER = ("queue", "prefill", "transfer", "decode_queue", "decode")


def write_plots(plot_dir: Path, results: list[PhaseResult], attainment_target: float) -> list[Path]:
    plot_dir.mkdir(parents=True, exist_ok=True)
    written = []
    targets = list(dict.fromkeys(r.target for r in results))
    finite = [r for r in results if not math.isinf(r.rate) and r.report.attainment is not None]
    if finite:
        written.append(_attainment(plot_dir / "attainment_vs_rate.png", finite, targets, attainment_target))
    for name, attr in (("ttft", "ttft_s"), ("tpot", "tpot_s")):
        written.append(_cdf(plot_dir / f"{name}_cdf.png", results, attr, name.upper()))
    if any(x.timings for r in results for x in r.records):
        written.append(_breakdown(plot_dir / "phase_breakdown.png", results))
    plt.close("all")
    return written


def _attainment(path: Path, results: list[PhaseResult], targets: list[str], target: float) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for t in targets:
        points = sorted((r.rate, r.report.attainment) for r in results if r.target == t)
        if points:
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=t)
    ax.axhline(100 * target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.0%}")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("SLO attainment (%)")
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _cdf(path: Path, results: list[PhaseResult], attr: str, name: str) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        values = sorted(getattr(x, attr) * 1000 for x in r.records if getattr(x, attr) is not None)
        if values:
            ax.plot(values, [(i + 1) / len(values) for i in range(len(values))],
                    label=f"{r.target} @ {rate_label(r.rate)} req/s")
    ax.set_xlabel(f"{name} (ms)")
    ax.set_ylabel("fraction of requests")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _breakdown(path: Path, results: list[PhaseResult]) -> Path:
    """Mean seconds per server-reported phase, stacked, one bar per (target, rate)."""
    labels, means = [], []
    for r in results:
        timed = [x.timings for x in r.records if x.timings]
        if timed:
            labels.append(f"{r.target}\n{rate_label(r.rate)} req/s")
            means.append({p: sum(t.get(p, 0.0) for t in timed) / len(timed) * 1000 for p in PHASE_ORDER})
    fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(labels) + 2), 4))
    bottom = [0.0] * len(labels)
    for phase in PHASE_ORDER:
        heights = [m[phase] for m in means]
        if any(heights):
            ax.bar(labels, heights, bottom=bottom, label=phase)
            bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_ylabel("mean time per request (ms)")
    ax.set_title("Server-reported latency by phase")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
