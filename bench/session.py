"""One benchmark run: discover the targets, build the workload once, warm each target up,
then run the phases (one rate, a sweep, or a goodput search), interleaving targets so
machine noise falls on all of them alike, with a live progress line per phase.

Everything measured is kept in the Session, so Ctrl-C still leaves a partial report.
"""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass, field

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from bench.arrivals import arrival_times
from bench.client import auth_headers
from bench.config import BenchConfig
from bench.corpus import TokenCounter
from bench.datasets import BenchRequest, build_requests
from bench.goodput_search import GoodputSearch
from bench.report import PhaseResult, rate_label
from bench.runner import Phase, PhaseState, run_phase


def _console() -> Console:
    console = Console()
    return console if console.is_terminal else Console(width=160)  # logs: no 80-column wrapping


def _status(state: PhaseState) -> str:
    att = state.attainment
    return (f"sent {state.sent}  ok {len(state.records) - state.num_failed}  failed {state.num_failed}"
            + ("" if att is None else f"  attainment {att:.0%}"))


@dataclass(frozen=True)
class TargetInfo:
    name: str
    url: str
    model: str | None
    max_model_len: int | None


async def discover(name: str, url: str, api_key: str | None) -> TargetInfo:
    """The served model and context length from /v1/models; unknown when that fails."""
    try:
        async with httpx.AsyncClient(timeout=10.0, headers=auth_headers(api_key)) as http:
            data = (await http.get(f"{url}/v1/models")).raise_for_status().json()["data"][0]
        return TargetInfo(name, url, data["id"], data.get("max_model_len"))
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return TargetInfo(name, url, None, None)


@dataclass
class Session:
    config: BenchConfig
    console: Console = field(default_factory=_console)
    targets: list[TargetInfo] = field(default_factory=list)
    requests: list[BenchRequest] = field(default_factory=list)
    results: list[PhaseResult] = field(default_factory=list)
    searches: dict[str, GoodputSearch] = field(default_factory=dict)
    current: PhaseState | None = None

    async def run(self) -> None:
        cfg = self.config
        self.targets = list(await asyncio.gather(*(discover(n, u, cfg.api_key) for n, u in cfg.targets)))
        for t in self.targets:
            if t.model is None:
                self.console.print(f"[yellow]{t.name}: {t.url}/v1/models did not answer; its requests will "
                                   "probably fail and be counted as failures[/yellow]")
        self._build_workload()
        measured = self.requests  # every phase sends the same requests, at its own rate
        if cfg.warmup:
            warm = [measured[i % len(measured)] for i in range(cfg.warmup)]
            for t in self.targets:
                await self._phase(t, math.inf, warm, warmup=True)
        if cfg.find_goodput:
            self.searches = {t.name: GoodputSearch(cfg.attainment_target, cfg.request_rate, cfg.max_search_phases)
                             for t in self.targets}
            while not all(s.done for s in self.searches.values()):
                for t in self.targets:  # one step of every search, interleaved
                    search = self.searches[t.name]
                    if (rate := search.next_rate()) is not None:
                        result = await self._phase(t, rate, measured)
                        search.record(rate, result.report.attainment or 0.0)
        else:
            for rate in cfg.rates:
                for t in self.targets:
                    await self._phase(t, rate, measured)

    def _build_workload(self) -> None:
        cfg = self.config
        counter = TokenCounter.load(cfg.tokenizer)
        lens = [t.max_model_len for t in self.targets if t.max_model_len]
        self.requests = build_requests(cfg.dataset, counter, min(lens) if lens else None)
        if not self.requests:
            raise ValueError("the workload is empty (every prompt was too long for the server's context?)")
        prompt = [r.prompt_tokens for r in self.requests]
        output = [r.max_tokens for r in self.requests]
        how = "counted with the given tokenizer" if counter.exact else \
            "ESTIMATED at 4 characters a token (give --tokenizer to count exactly)"
        lengths = (f"prompt tokens mean {sum(prompt) / len(prompt):.0f} [{min(prompt)}-{max(prompt)}] {how}; "
                   f"output tokens mean {sum(output) / len(output):.0f} [{min(output)}-{max(output)}]")
        self.console.print(f"workload {cfg.dataset.name}: {len(self.requests)} requests "
                           f"(+{cfg.warmup} warm-up replays), {lengths}")

    async def _phase(self, target: TargetInfo, rate: float, requests: list[BenchRequest],
                     warmup: bool = False) -> PhaseResult:
        cfg = self.config
        phase = Phase(target.name, target.url, cfg.endpoint, cfg.model or target.model, rate, requests,
                      _send_times(requests, rate, cfg.burstiness, cfg.dataset.seed),
                      max_concurrency=cfg.max_concurrency or (4 if warmup else None),
                      timeout_s=cfg.request_timeout_s, duration_s=None if warmup else cfg.duration_s,
                      ignore_eos=cfg.ignore_eos, api_key=cfg.api_key, temperature=cfg.temperature)
        label = f"{target.name} warm-up" if warmup else f"{target.name} @ {rate_label(rate)} req/s"
        live = self.console.is_terminal  # a log file gets one plain line per phase instead
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
                      transient=warmup, disable=not live) as progress:
            task = progress.add_task(label, total=len(requests), status="")
            state = PhaseState(phase, cfg.slo, on_change=lambda s: progress.update(
                task, completed=len(s.records), status=_status(s)))
            if not warmup:
                self.current = state
            await run_phase(state)
        if not live and not warmup:
            self.console.print(f"{label}: {_status(state)}, {state.elapsed_s:.1f} s", soft_wrap=True)
        result = PhaseResult.of(state, cfg.slo)
        if not warmup:
            self.current = None
            self.results.append(result)
        return result

    def partial(self) -> list[PhaseResult]:
        """Finished phases plus what the interrupted one had measured."""
        if self.current is None or self.current.start_s is None:
            return list(self.results)
        return [*self.results, PhaseResult.of(self.current, self.config.slo, interrupted=True)]


def _send_times(requests: list[BenchRequest], rate: float, burstiness: float, seed: int) -> list[float]:
    """A trace's own times (`at_s` on every request), else arrivals at the rate."""
    if requests and all(r.at_s is not None for r in requests):
        return [r.at_s for r in requests]  # type: ignore[misc]
    return arrival_times(len(requests), rate, burstiness, seed)
