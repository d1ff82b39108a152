"""`pdserve bench` / `python -m bench` flags, parsed into one frozen BenchConfig."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass

from bench.datasets import WORKLOADS, DatasetSpec
from bench.metrics import SLO

DATASETS = ("random", "shift", *WORKLOADS, "file")
ENDPOINTS = ("completions", "chat", "/v1/completions", "/v1/chat/completions")
VLLM_DATASETS = {"random": "random", "sharegpt": "file", "custom": "file"}  # `vllm bench serve --dataset-name`


@dataclass(frozen=True)
class BenchConfig:
    targets: tuple[tuple[str, str], ...]  # (name, base URL)
    model: str | None
    endpoint: str
    request_rate: float
    burstiness: float
    max_concurrency: int | None
    duration_s: float | None
    warmup: int
    dataset: DatasetSpec
    tokenizer: str | None
    slo: SLO
    attainment_target: float
    sweep_rates: tuple[float, ...]
    find_goodput: bool
    max_search_phases: int
    request_timeout_s: float
    ignore_eos: bool
    api_key: str | None
    result_json: str | None
    plot_dir: str | None
    temperature: float = 0.0
    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl")
    metric_percentiles: tuple[float, ...] = (99.0,)
    result_file: str | None = None  # vLLM's flat result JSON (--save-result)

    @property
    def rates(self) -> tuple[float, ...]:
        return self.sweep_rates or (self.request_rate,)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["api_key"] = "***" if self.api_key else None
        d["request_rate"] = str(self.request_rate)
        return d


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pdserve bench", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="SLO-aware load test of OpenAI-compatible servers (pdserve, vLLM, SGLang): "
                    "streaming requests with gamma/Poisson arrivals; TTFT, TPOT, ITL, E2EL, SLO "
                    "attainment and goodput, per target, with rate sweeps and goodput search.")
    t = p.add_argument_group("targets")
    t.add_argument("--base-url", help="server to load, e.g. http://127.0.0.1:8000")
    t.add_argument("--target", action="append", default=[], metavar="NAME=URL",
                   help="a named server; repeat to compare several in one run (phases interleaved)")
    t.add_argument("--model", help="model name to send (default: each server's first /v1/models entry)")
    t.add_argument("--endpoint", choices=ENDPOINTS, default="completions",
                   help="completions or chat (vLLM's spellings /v1/completions, /v1/chat/completions too)")
    t.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="bearer token (default $OPENAI_API_KEY)")
    t.add_argument("--request-timeout-s", type=float, default=300.0, help="a request taking longer fails")
    load = p.add_argument_group("load")
    load.add_argument("--request-rate", type=float, default=math.inf, help="requests/s; inf sends all at once")
    load.add_argument("--burstiness", type=float, default=1.0,
                      help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 smoother")
    load.add_argument("--max-concurrency", type=int, help="at most this many requests in flight")
    load.add_argument("--num-prompts", type=int, default=100, help="measured requests per phase")
    load.add_argument("--duration-s", type=float, help="stop sending a phase's requests after this long")
    load.add_argument("--seed", type=int, default=0, help="seed of the arrivals and the prompts")
    load.add_argument("--warmup", "--num-warmups", type=int, default=0,
                      help="per target, first replay this many of the workload's requests (cycling), not "
                           "counted: servers that specialise kernels by shape reach their steady state")
    w = p.add_argument_group("workload")
    w.add_argument("--dataset", nargs="+", default=["random"], metavar="NAME [PATH]",
                   help=f"one of {', '.join(DATASETS)}; `file PATH` takes JSONL or ShareGPT JSON")
    w.add_argument("--dataset-name", choices=tuple(VLLM_DATASETS), help="vLLM's spelling: random, or sharegpt / "
                   "custom with --dataset-path (the same as --dataset file PATH)")
    w.add_argument("--dataset-path", help="with --dataset-name sharegpt or custom: the file")
    w.add_argument("--input-len", "--random-input-len", type=int, help="random: prompt tokens; synthetic: mean "
                                                                       "prompt tokens")
    w.add_argument("--output-len", "--random-output-len", type=int, help="random: output tokens; synthetic: mean "
                                                                         "output tokens")
    w.add_argument("--range-ratio", "--random-range-ratio", type=float, default=0.0,
                   help="random: lengths uniform in L*(1 +- r)")
    w.add_argument("--tokenizer", help="tokenizer (HF folder or .gguf) to count prompt tokens exactly; "
                                       "without it lengths are estimated at 4 characters a token")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let requests stop at EOS (default: generate exactly max_tokens)")
    w.add_argument("--ignore-eos", dest="ignore_eos", action="store_true", help="generate exactly max_tokens (the default)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature of every request (0: greedy)")
    s = p.add_argument_group("SLOs")
    s.add_argument("--slo-ttft-ms", type=float)
    s.add_argument("--slo-tpot-ms", type=float)
    s.add_argument("--slo-e2el-ms", type=float)
    s.add_argument("--goodput", nargs="+", metavar="KEY:MS", help="the same SLOs as ttft:X tpot:Y e2el:Z")
    s.add_argument("--attainment-target", type=float, default=0.9,
                   help="fraction of requests that must meet the SLOs for a rate to count as sustained (goodput)")
    sw = p.add_argument_group("sweeps")
    sw.add_argument("--sweep-rates", help="comma-separated request rates, each a phase per target")
    sw.add_argument("--find-goodput", action="store_true",
                    help="bisect the rate (from --request-rate) for the highest one meeting the target")
    sw.add_argument("--max-search-phases", type=int, default=8, help="--find-goodput: at most this many phases")
    o = p.add_argument_group("output")
    o.add_argument("--result-json", help="write the summary and every per-request record here")
    o.add_argument("--plot-dir", help="write PNG plots here")
    o.add_argument("--save-result", action="store_true", help="also write vLLM bench serve's flat result JSON "
                   "(mean_ttft_ms, p99_itl_ms, ...) per phase, in --result-dir as --result-filename")
    o.add_argument("--result-dir", default=".", help="with --save-result: the folder")
    o.add_argument("--result-filename", help="with --save-result: the file name (several phases: each gets "
                   "-TARGET-RATEqps before .json); default TARGET-RATEqps-DATE.json")
    o.add_argument("--percentile-metrics", default="ttft,tpot,itl", help="in the vLLM result: the metrics given "
                   "percentiles, from ttft, tpot, itl, e2el")
    o.add_argument("--metric-percentiles", default="99", help="in the vLLM result: the percentiles, e.g. 50,90,99")
    return p


def parse_slo(args: argparse.Namespace) -> SLO:
    values = {"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms, "e2el": args.slo_e2el_ms}
    for item in args.goodput or []:
        key, sep, ms = item.partition(":")
        if not sep or key.lower() not in values:
            raise ValueError(f"--goodput takes ttft:MS tpot:MS e2el:MS, got {item!r}")
        try:
            values[key.lower()] = float(ms)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {ms!r} is not a number of milliseconds") from None
    for key, v in values.items():
        if v is not None and v <= 0:
            raise ValueError(f"the {key} SLO must be positive")
    return SLO(values["ttft"], values["tpot"], values["e2el"])


def parse_targets(args: argparse.Namespace) -> tuple[tuple[str, str], ...]:
    targets = []
    for item in args.target:
        name, sep, url = item.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise ValueError(f"--target takes NAME=http://host:port, got {item!r}")
        targets.append((name, url.rstrip("/")))
    if args.base_url:
        targets.insert(0, ("server", args.base_url.rstrip("/")))
    if not targets:
        raise ValueError("give --base-url URL or at least one --target NAME=URL")
    if len({n for n, _ in targets}) != len(targets):
        raise ValueError("target names must be distinct")
    return tuple(targets)


def _dataset(args: argparse.Namespace) -> list[str]:
    """--dataset's words, from vLLM's --dataset-name / --dataset-path when those are given."""
    if args.dataset_name is None:
        if args.dataset_path is not None:
            raise ValueError("--dataset-path goes with --dataset-name sharegpt or custom")
        return args.dataset
    if args.dataset != ["random"]:
        raise ValueError("use either --dataset or --dataset-name")
    name = VLLM_DATASETS[args.dataset_name]
    if (name == "file") != (args.dataset_path is not None):
        raise ValueError(f"--dataset-name {args.dataset_name} {'needs' if name == 'file' else 'takes no'} --dataset-path")
    return [name, args.dataset_path] if name == "file" else [name]


def from_args(args: argparse.Namespace) -> BenchConfig:
    name, *rest = _dataset(args)
    if name not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}")
    if (name == "file") != bool(rest) or len(rest) > 1:
        raise ValueError("use `--dataset file PATH` (and a path only with `file`)")
    if args.num_prompts < 1 or args.warmup < 0:
        raise ValueError("--num-prompts must be >= 1 and --warmup >= 0")
    if args.request_rate <= 0 or args.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError("--max-concurrency must be >= 1")
    try:
        sweep = tuple(float(r) for r in args.sweep_rates.split(",")) if args.sweep_rates else ()
    except ValueError:
        raise ValueError(f"--sweep-rates takes numbers separated by commas, got {args.sweep_rates!r}") from None
    if any(r <= 0 for r in sweep):
        raise ValueError("--sweep-rates must all be positive")
    if sweep and args.find_goodput:
        raise ValueError("use either --sweep-rates or --find-goodput")
    slo = parse_slo(args)
    if args.find_goodput and slo.empty:
        raise ValueError("--find-goodput needs SLOs (--slo-*-ms or --goodput)")
    if args.max_search_phases < 1:
        raise ValueError("--max-search-phases must be >= 1")
    if not 0 < args.attainment_target <= 1:
        raise ValueError("--attainment-target must be in (0, 1]")
    metrics = tuple(m.strip() for m in args.percentile_metrics.split(",") if m.strip())
    if not metrics or set(metrics) - {"ttft", "tpot", "itl", "e2el"}:
        raise ValueError(f"--percentile-metrics takes ttft, tpot, itl, e2el separated by commas, got "
                         f"{args.percentile_metrics!r}")
    try:
        percentiles = tuple(float(q) for q in args.metric_percentiles.split(","))
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers separated by commas, got {args.metric_percentiles!r}") \
            from None
    if not all(0 < q <= 100 for q in percentiles):
        raise ValueError("--metric-percentiles must be in (0, 100]")
    if args.temperature < 0:
        raise ValueError("--temperature must be >= 0")
    if (args.result_filename or args.result_dir != ".") and not args.save_result:
        raise ValueError("--result-dir and --result-filename go with --save-result")
    result_file = None
    if args.save_result:  # the folder, with a trailing separator when no file name was given
        result_file = os.path.join(args.result_dir, args.result_filename or "")
    spec = DatasetSpec(name, args.num_prompts, args.input_len, args.output_len, args.range_ratio,
                       rest[0] if rest else None, args.seed)
    return BenchConfig(
        targets=parse_targets(args), model=args.model, endpoint=args.endpoint.removeprefix("/v1/").replace(
            "chat/completions", "chat"), request_rate=args.request_rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, duration_s=args.duration_s,
        warmup=args.warmup, dataset=spec, tokenizer=args.tokenizer, slo=slo,
        attainment_target=args.attainment_target, sweep_rates=sweep, find_goodput=args.find_goodput,
        max_search_phases=args.max_search_phases, request_timeout_s=args.request_timeout_s,
        ignore_eos=args.ignore_eos, api_key=args.api_key, result_json=args.result_json, plot_dir=args.plot_dir,
        temperature=args.temperature, percentile_metrics=metrics, metric_percentiles=percentiles,
        result_file=result_file)
