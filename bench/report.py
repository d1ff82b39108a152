"""What a benchmark run prints and saves: per-target tables (one column per measured rate),
a goodput summary across targets, failure reasons, and the JSON of every record."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench.goodput_search import GoodputSearch
from bench.metrics import SLO, Report, RequestRecord, Summary, summarize
from bench.runner import PhaseState


@dataclass
class PhaseResult:
    target: str
    rate: float
    records: list[RequestRecord]
    duration_s: float
    report: Report
    interrupted: bool = False

    @classmethod
    def of(cls, state: PhaseState, slo: SLO, interrupted: bool = False) -> "PhaseResult":
        records = list(state.records)
        return cls(state.phase.target, state.phase.rate, records, state.elapsed_s,
                   summarize(records, state.elapsed_s, slo), interrupted)


def rate_label(rate: float) -> str:
    return "inf" if math.isinf(rate) else f"{rate:g}"


def sweep_goodput(results: list[PhaseResult], target: str, attainment_target: float) -> float | None:
    """DistServe goodput from a sweep: the highest measured rate meeting the target."""
    ok = [r.rate for r in results if r.target == target and not math.isinf(r.rate)
          and r.report.attainment is not None and r.report.attainment >= attainment_target]
    return max(ok) if ok else None


def distserve_goodput(results: list[PhaseResult], searches: dict[str, GoodputSearch], target: str,
                      attainment_target: float) -> float | None:
    """From the target's goodput search when there was one, else from its sweep."""
    if target in searches:
        return searches[target].goodput
    return sweep_goodput(results, target, attainment_target)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f}"


def _summary_rows(name: str, s: Summary) -> list[tuple[str, str]]:
    return [(f"{name} mean (ms)", _ms(s.mean)), (f"{name} median (ms)", _ms(s.median)),
            (f"{name} p90 (ms)", _ms(s.p90)), (f"{name} p99 (ms)", _ms(s.p99))]


def _rows(r: PhaseResult) -> list[tuple[str, str]]:
    rep = r.report
    prompt_tokens = sum(x.prompt_tokens for x in r.records if x.ok)
    rows = [("successful requests", str(rep.num_ok)), ("failed requests", str(rep.num_failed)),
            ("duration (s)", f"{rep.duration_s:.2f}"),
            ("request throughput (req/s)", f"{rep.request_throughput:.3f}"),
            ("output token throughput (tok/s)", f"{rep.output_token_throughput:.1f}"),
            ("total token throughput (tok/s)",
             f"{(prompt_tokens / rep.duration_s if rep.duration_s else 0) + rep.output_token_throughput:.1f}")]
    rows += _summary_rows("TTFT", rep.ttft_s) + _summary_rows("TPOT", rep.tpot_s)
    rows += _summary_rows("ITL (pooled)", rep.itl_s) + [("ITL (pooled) max (ms)", _ms(rep.itl_s.max))]
    rows += _summary_rows("E2EL", rep.e2el_s)
    rows += [("SLO attainment", "-" if rep.attainment is None else f"{rep.attainment:.1%}"),
             ("goodput, SLO-met req/s", "-" if rep.goodput_rps is None else f"{rep.goodput_rps:.3f}")]
    return rows


_PHASES = ("queue", "prefill", "transfer", "decode_queue", "decode", "kv_span")


def _timing_rows(records: list[RequestRecord]) -> list[tuple[str, str]]:
    """Means of the per-phase seconds the server reported (pdserve's x-pdserve-timings), the
    prompt KV moved per request and its rate, and the share of TTFT the exposed transfer took."""
    timed = [x.timings for x in records if x.ok and x.timings]
    mean = lambda key: statistics.fmean([t.get(key, 0.0) for t in timed]) if timed else None  # noqa: E731
    rows = [(f"server {name} mean (ms)", _ms(mean(name))) for name in _PHASES]
    kv_bytes, span, exposed = mean("kv_bytes"), mean("kv_span"), mean("transfer")
    ttfts = [x.ttft_s for x in records if x.ok and x.timings and x.ttft_s is not None]
    ttft = statistics.fmean(ttfts) if ttfts else None
    rows += [("server KV per request (MB)", "-" if not kv_bytes else f"{kv_bytes / 1e6:.2f}"),
             ("server KV transfer rate (MB/s)", "-" if not kv_bytes or not span else f"{kv_bytes / span / 1e6:.0f}"),
             ("exposed transfer / TTFT", "-" if exposed is None or not ttft or not kv_bytes else f"{exposed / ttft:.1%}")]
    return rows


def print_report(console: Console, results: list[PhaseResult], slo: SLO, attainment_target: float,
                 searches: dict[str, GoodputSearch] | None = None) -> None:
    targets = list(dict.fromkeys(r.target for r in results))
    for target in targets:
        mine = [r for r in results if r.target == target]
        table = Table(title=f"{target}", title_justify="left")
        table.add_column("metric")
        for r in mine:
            table.add_column(f"rate {rate_label(r.rate)}" + (" (interrupted)" if r.interrupted else ""),
                             justify="right")
        timed = any(x.timings for r in mine for x in r.records)
        columns = [_rows(r) + (_timing_rows(r.records) if timed else []) for r in mine]
        for i, (name, _) in enumerate(columns[0]):
            table.add_row(name, *(col[i][1] for col in columns))
        console.print(table)
        failures = Counter(_reason(x.error) for r in mine for x in r.records if not x.ok)
        for reason, count in failures.most_common(5):
            console.print(f"  [red]{count} failed[/red]: {reason}")
    if slo.empty:
        console.print("No SLO given: attainment and goodput need --slo-* or --goodput.")
        return
    _print_goodput(console, results, targets, slo, attainment_target, searches or {})


def _print_goodput(console: Console, results: list[PhaseResult], targets: list[str], slo: SLO,
                   attainment_target: float, searches: dict[str, GoodputSearch]) -> None:
    limits = ", ".join(f"{k} <= {v:g} ms" for k, v in (("TTFT", slo.ttft_ms), ("TPOT", slo.tpot_ms),
                                                       ("E2EL", slo.e2el_ms)) if v is not None)
    table = Table(title=f"Goodput (SLO: {limits}; attainment target {attainment_target:.0%})",
                  title_justify="left")
    table.add_column("target")
    table.add_column("DistServe goodput: max rate at target (req/s)", justify="right")
    table.add_column("ratio", justify="right")
    table.add_column("best SLO-met req/s", justify="right")
    table.add_column("ratio", justify="right")
    best = {t: max((r.report.goodput_rps or 0.0 for r in results if r.target == t), default=0.0) for t in targets}
    distserve = {t: distserve_goodput(results, searches, t, attainment_target) for t in targets}
    base = targets[0]
    for t in targets:
        text = searches[t].describe() if t in searches else (
            "-" if distserve[t] is None else f"{distserve[t]:.3g} (sweep)")
        table.add_row(t, text, _ratio(distserve[t], distserve[base]), f"{best[t]:.3f}", _ratio(best[t], best[base]))
    console.print(table)


def _ratio(value: float | None, base: float | None) -> str:
    return "-" if not value or not base else f"{value / base:.2f}x"


def _reason(error: str | None) -> str:
    return (error or "unknown")[:100]


def write_json(path: Path, config: dict, results: list[PhaseResult], searches: dict[str, GoodputSearch],
               attainment_target: float) -> None:
    payload = {
        "config": config,
        "phases": [{"target": r.target, "rate": rate_label(r.rate), "duration_s": r.duration_s,
                    "interrupted": r.interrupted, "summary": asdict(r.report),
                    "records": [asdict(x) for x in r.records]} for r in results],
        "goodput": {t: {"distserve_rps": distserve_goodput(results, searches, t, attainment_target),
                        "search": searches[t].history if t in searches else None}
                    for t in dict.fromkeys(r.target for r in results)},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1))
