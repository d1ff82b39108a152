"""`pdserve` command line: `serve`, `bench` (the load tester, also `python -m bench`),
`profile` (the engine's latency model on this machine, bench/lab/latency_profile.py) and `plan` (workers
for a workload and SLOs, scheduler/planner/cli.py)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys

from engine.cli_help import DefaultsHelpFormatter
from engine.config import EngineBackend, EngineConfig, Role
from scheduler.config import ServeConfig, ServeMode, add_dataclass_args, from_args

log = logging.getLogger("pdserve")
API_KEY_ENV = "PDSERVE_API_KEY"


def build_server(engine_config: EngineConfig, config: ServeConfig = ServeConfig(mode=ServeMode.COLOCATED)):
    """Engine, its loop thread(s), client and FastAPI app for colocated or semi-PD serving (one
    process). Returns (app, loop)."""
    from engine.models.registry import model_name, resolve_model_path
    from scheduler.api.server import ServerState, build_app
    from scheduler.engine_client import InProcessClient
    from scheduler.metrics import ServerMetrics
    from scheduler.tokenizer import Tokenizer

    model_path = resolve_model_path(engine_config.model)  # fails fast on a bad --model
    log.info("loading the tokenizer of %s", model_path)
    tokenizer = Tokenizer.load(model_path)
    log.info("starting the %s engine (%s)", engine_config.engine, config.mode)
    if config.mode == ServeMode.SEMI_PD:
        from engine.worker.semi_pd import SemiPD
        loop = SemiPD(engine_config, config.semi_pd_prefill_share, config.split_controller_or_none(),
                      config.worker).start()
        role, control = Role.SEMI_PD, loop.control
    else:
        from engine.worker.build import build_engine
        from engine.worker.loop import EngineLoop
        loop, role, control = EngineLoop(build_engine(engine_config, disaggregated=False)).start(), Role.COLOCATED, None
    name = engine_config.served_model_name or model_name(engine_config.model)
    client = InProcessClient(loop, name, config.slo_ttft_ms / 1000, role, control)
    state = ServerState(client, tokenizer, name, config.api_key, ServerMetrics(config, name), config.limits,
                        config.api_key_protects_metrics, max_queued=config.limits.max_queued_requests,
                        **front_door_options(config))
    return build_app(state), loop


def front_door_options(config: ServeConfig) -> dict:
    """ServerState's request-handling options from the serve config."""
    return {"strict_fields": config.strict_fields,
            "tool_call_parser": None if config.tool_call_parser == "none" else config.tool_call_parser}


def build_disagg_server(config: ServeConfig, engine_config: EngineConfig):
    """Ray cluster (scheduler, prefill and decode worker actors), client and FastAPI app for
    disaggregated serving. Returns (app, cluster); the caller stops the cluster."""
    from engine.models.registry import model_name, resolve_model_path
    from scheduler.api.server import ServerState, build_app
    from scheduler.cluster import Cluster, ClusterSpec
    from scheduler.disagg_client import DisaggClient
    from scheduler.engine_client import ModelInfo
    from scheduler.metrics import ServerMetrics
    from scheduler.tokenizer import Tokenizer

    model_path = resolve_model_path(engine_config.model)  # fails fast on a bad --model
    log.info("loading the tokenizer of %s", model_path)
    tokenizer = Tokenizer.load(model_path)
    log.info("starting the Ray cluster: %d prefill and %d decode workers (%s engine)", config.prefill_workers,
             config.decode_workers, engine_config.engine)
    prefill_tp = config.prefill_tp or engine_config.tensor_parallel_size
    decode_tp = config.decode_tp or engine_config.tensor_parallel_size
    check_degrees(engine_config, model_path, prefill_tp, decode_tp)
    spec = ClusterSpec(config.prefill_workers, config.decode_workers, config.ray_address, config.policy,
                       config.worker, policy_config=config.policy_config, controller=config.role_controller_or_none(),
                       prefill_tp=prefill_tp, decode_tp=decode_tp)
    cluster = Cluster(spec, engine_config).start()
    try:
        max_model_len, vocab_size = cluster.limits()
        name = engine_config.served_model_name or model_name(engine_config.model)
        client = DisaggClient(cluster.scheduler, ModelInfo(name, max_model_len, vocab_size), config.policy,
                              policy_config=config.policy_config, slo_ttft_s=config.slo_ttft_ms / 1000)
        state = ServerState(client, tokenizer, name, config.api_key, ServerMetrics(config, name), config.limits,
                            config.api_key_protects_metrics, **front_door_options(config))
        return build_app(state), cluster
    except BaseException:
        cluster.stop()
        raise


def check_degrees(engine_config: EngineConfig, model_path, prefill_tp: int, decode_tp: int) -> None:
    """Refuses, before anything starts, tensor-parallel degrees that cannot split the model or
    that the engine's other settings rule out."""
    from dataclasses import replace

    from engine.models.config import read_config
    from engine.parallel.shard import check
    cfg = read_config(model_path)
    for flag, size in (("--prefill-tp", prefill_tp), ("--decode-tp", decode_tp)):
        try:
            replace(engine_config, tensor_parallel_size=size)  # the engine's own refusals (e.g. --engine vllm)
            check(cfg, size)
        except ValueError as e:
            raise ValueError(f"{flag} {size}: {e}") from None


def _check_port_free(host: str, port: int) -> None:
    """A busy port is a clear error before the model loads, not a traceback after."""
    import socket
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise ValueError(f"cannot listen on {host}:{port}: {e.strerror}") from None


def serve(config: ServeConfig, engine_config: EngineConfig) -> None:
    from scheduler.api.http_server import make_server
    _check_port_free(config.host, config.port)
    if engine_config.engine == EngineBackend.VLLM and config.mode == ServeMode.SEMI_PD:
        raise ValueError("--mode semi-pd runs pdserve's own engine only (its two streams share one KV pool); "
                         "with --engine vllm use --mode colocated or disagg")
    if config.mode != ServeMode.DISAGG and (config.prefill_tp or config.decode_tp):
        raise ValueError(f"--prefill-tp and --decode-tp size disaggregated pools; --mode {config.mode} runs "
                         "--tensor-parallel-size ranks")
    if config.mode in (ServeMode.COLOCATED, ServeMode.SEMI_PD):
        app, loop = build_server(engine_config, config)
        log.info("serving %s on http://%s:%d (%s, %d KV blocks)", app.state.pd.model_name, config.host, config.port,
                 config.mode, loop.engine.info.num_kv_blocks)
        stop = loop.shutdown
    else:
        app, cluster = build_disagg_server(config, engine_config)
        log.info("serving %s on http://%s:%d (%d prefill, %d decode workers)", app.state.pd.model_name,
                 config.host, config.port, config.prefill_workers, config.decode_workers)
        stop = cluster.stop
    try:
        make_server(app, config.host, config.port, config.limits, config.log_level,
                    access_log=not config.disable_access_log).run()
    finally:
        stop()


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # every logger of the process, uvicorn's too


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pdserve", description="Disaggregated LLM serving",
                                     formatter_class=DefaultsHelpFormatter)
    from scheduler.api.utility import pdserve_version
    parser.add_argument("--version", action="version", version=f"pdserve {pdserve_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                             formatter_class=DefaultsHelpFormatter)
    add_dataclass_args(p_serve, ServeConfig)
    add_dataclass_args(p_serve, EngineConfig)
    sub.add_parser("bench", help="load-test OpenAI-compatible servers under latency SLOs (see `pdserve bench -h`)")
    sub.add_parser("profile", help="measure the engine on this machine and fit its latency model "
                                   "(see `pdserve profile -h`)")
    sub.add_parser("plan", help="prefill and decode workers for a workload, rate and SLOs, simulated from a "
                                "profile (see `pdserve plan -h`)")
    sub.add_parser("kvpred", help="KV prediction: train a small model that fills the prompt's KV cache "
                                  "(see `pdserve kvpred train -h`)")
    return parser


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """`pdserve serve`'s ServeConfig; the API key from PDSERVE_API_KEY when --api-key is not
    given (an environment variable, e.g. from a Kubernetes Secret, stays out of the process list)."""
    config = from_args(ServeConfig, args)
    if config.api_key is None and os.environ.get(API_KEY_ENV):
        config = dataclasses.replace(config, api_key=os.environ[API_KEY_ENV])
    return config


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its own parser, so `pdserve bench --help` shows every flag
        from bench.cli import main as bench_main
        return bench_main(argv[1:])
    if argv[:1] == ["profile"]:
        from bench.lab.latency_profile import main as profile_main
        return profile_main(argv[1:])
    if argv[:1] == ["plan"]:
        from scheduler.planner.cli import main as plan_main
        return plan_main(argv[1:])
    if argv[:1] == ["kvpred"]:
        from engine.kvpred.cli import main as kvpred_main
        return kvpred_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            config, engine_config = serve_config(args), from_args(EngineConfig, args)
            logging.basicConfig(level=config.log_level.upper(), format=LOG_FORMAT)
            serve(config, engine_config)
    except (ValueError, FileNotFoundError) as e:
        print(f"pdserve: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
