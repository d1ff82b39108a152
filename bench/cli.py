"""Entry point of `pdserve bench` and `python -m bench`."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from bench.config import build_parser, from_args
from bench.plots import write_plots
from bench.report import print_report, write_json
from bench.session import Session
from bench.vllm_result import write_flat_results


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = from_args(args)
    except ValueError as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    session = Session(config)
    code = 0
    try:
        asyncio.run(session.run())
    except KeyboardInterrupt:
        session.console.print("[yellow]interrupted: reporting what was measured[/yellow]")
        code = 130
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve bench: error: {e}", file=sys.stderr)
        return 2
    results = session.partial()
    if not results:
        session.console.print("nothing was measured")
        return code
    print_report(session.console, results, config.slo, config.attainment_target, session.searches)
    if config.result_json:
        write_json(Path(config.result_json), config.as_dict(), results, session.searches, config.attainment_target)
        session.console.print(f"records: {config.result_json}")
    if config.result_file is not None:
        for path in write_flat_results(config.result_file, results, model=config.model,
                                       num_prompts=config.dataset.num_prompts, burstiness=config.burstiness,
                                       max_concurrency=config.max_concurrency, metrics=config.percentile_metrics,
                                       percentiles=config.metric_percentiles):
            session.console.print(f"vLLM-format result: {path}")
    if config.plot_dir:
        for path in write_plots(Path(config.plot_dir), results, config.attainment_target):
            session.console.print(f"plot: {path}")
    if code == 0 and not any(r.report.num_ok for r in results):
        session.console.print("[red]every request failed[/red]")
        return 1
    return code
