"""`vllm bench serve`'s flat result JSON (`--save-result`), one file per phase, so scripts and
dashboards written for vLLM's results read ours: completed, failed, throughputs, and for each
of --percentile-metrics its mean_, median_, std_ and p<q>_ values in milliseconds."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from bench.metrics import percentile
from bench.report import PhaseResult, rate_label


def flat_result(result: PhaseResult, model: str | None, num_prompts: int, burstiness: float,
                max_concurrency: int | None, metrics: tuple[str, ...], percentiles: tuple[float, ...]) -> dict:
    ok = [r for r in result.records if r.ok]
    values = {"ttft": [r.ttft_s for r in ok if r.ttft_s is not None],
              "tpot": [r.tpot_s for r in ok if r.tpot_s is not None],
              "itl": [gap for r in ok for gap in r.itl_s],
              "e2el": [r.e2el_s for r in ok if r.e2el_s is not None]}
    duration = result.duration_s
    out = {
        "date": time.strftime("%Y%m%d-%H%M%S"), "backend": "openai", "model_id": model, "target": result.target,
        "num_prompts": num_prompts, "request_rate": rate_label(result.rate), "burstiness": burstiness,
        "max_concurrency": max_concurrency, "duration": duration, "completed": len(ok),
        "failed": len(result.records) - len(ok),
        "total_input_tokens": sum(r.prompt_tokens for r in ok), "total_output_tokens": sum(r.output_tokens for r in ok),
        "request_throughput": result.report.request_throughput, "output_throughput": result.report.output_token_throughput,
        "total_token_throughput": sum(r.prompt_tokens + r.output_tokens for r in ok) / duration if duration > 0 else 0.0,
    }
    if result.report.goodput_rps is not None:
        out["request_goodput"] = result.report.goodput_rps
    for name in metrics:
        ms = [v * 1000 for v in values[name]]
        out[f"mean_{name}_ms"] = statistics.fmean(ms) if ms else 0.0
        out[f"median_{name}_ms"] = statistics.median(ms) if ms else 0.0
        out[f"std_{name}_ms"] = statistics.pstdev(ms) if ms else 0.0
        for q in percentiles:
            out[f"p{q:g}_{name}_ms"] = percentile(ms, q) or 0.0
    return out


def write_flat_results(base: str, results: list[PhaseResult], **kw) -> list[Path]:
    """base: the folder, plus the file name if one was given. Returns the paths written."""
    folder, name = (Path(base), None) if base.endswith(("/", "\\")) or Path(base).is_dir() else \
        (Path(base).parent, Path(base).name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in results:
        label = f"{r.target}-{rate_label(r.rate)}qps"
        if name is None:
            file = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}.json"
        elif len(results) == 1:
            file = name
        else:
            file = f"{Path(name).stem}-{label}{Path(name).suffix or '.json'}"
        path = folder / file
        path.write_text(json.dumps(flat_result(r, **kw), indent=1))
        paths.append(path)
    return paths
