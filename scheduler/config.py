"""Process configuration for `pdserve serve`: the front door's own settings, composed with
the configs of the parts it starts (routing policy, worker options, role controller, semi-PD
split controller), each of which keeps its own defaults.

Flags are generated from the dataclass fields (same names, dashes for underscores) with each
field's docstring as help, so `--max-num-seqs` is `EngineConfig.max_num_seqs`. A field that
holds a sub-config contributes that config's fields, under the prefix in its metadata
(`--controller-window-s` is `ServeConfig.controller.window_s`).
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, is_dataclass

from engine.config import WorkerOptions, as_enum, field_help
from engine.worker.split_controller import SplitControllerConfig
from scheduler.api.limits import FrontDoorLimits
from scheduler.controller import ControllerConfig
from scheduler.policies import DEFAULT_POLICY, POLICIES, PolicyConfig


class ServeMode(enum.StrEnum):
    DISAGG = "disagg"
    COLOCATED = "colocated"
    SEMI_PD = "semi-pd"


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _sub(default, prefix: str = ""):
    return field(default=default, metadata={"prefix": prefix})


@dataclass(frozen=True)
class ServeConfig:
    mode: ServeMode = ServeMode.DISAGG
    """Serving mode: disagg (prefill and decode worker pools on Ray, KV shipped layer by layer), colocated (one engine in this process does both) or semi-pd (one process, prefill and decode as two concurrent streams over one KV pool, each on its share of the device)."""
    host: str = "127.0.0.1"
    """Address to bind the HTTP server to."""
    port: int = 8000
    """Port of the HTTP server."""
    api_key: str | None = None
    """If set, /v1 requests must send Authorization: Bearer <key>; default: the PDSERVE_API_KEY environment variable (which keeps the key out of the process list)."""
    api_key_protects_metrics: bool = False
    """With --api-key: /metrics and /openapi.json need the key too (by default they stay open, for scrapers and tools inside the cluster; /health always does)."""
    limits: FrontDoorLimits = _sub(FrontDoorLimits())
    """The front door's bounds on size, work and time."""
    strict_fields: bool = False
    """Refuse requests with a field pdserve does not know (400 naming it); by default such a field is logged once per name and counted in pdserve_request_unknown_fields_total."""
    tool_call_parser: str = "hermes"
    """How tool_choice auto finds tool calls in the model's text: hermes (<tool_call>{...}</tool_call>) or llama3_json ({"name": ..., "parameters": ...}); none: tool_choice auto is refused."""
    log_level: str = "info"
    """Log level of the server and of pdserve's own loggers (debug, info, warning, error, critical)."""
    disable_access_log: bool = False
    """Do not log a line per HTTP request."""
    prefill_workers: int = 1
    """disagg: number of prefill worker actors (one GPU each, or a share of the CPU cores)."""
    decode_workers: int = 1
    """disagg: number of decode worker actors."""
    prefill_tp: int | None = None
    """disagg: tensor-parallel ranks of each prefill worker (one Ray placement-group bundle per rank, packed on one node); default: --tensor-parallel-size."""
    decode_tp: int | None = None
    """disagg: tensor-parallel ranks of each decode worker; default: --tensor-parallel-size. Any two degrees that split the model's KV heads work together: each decode rank receives exactly its heads from the prefill ranks holding them."""
    ray_address: str | None = None
    """disagg: address of a running Ray cluster to join (e.g. 10.0.0.1:6379); default: start one on this machine."""
    policy: str = DEFAULT_POLICY
    """disagg: routing policy: jsq (prefill by pending prompt tokens, decode by free KV blocks), round-robin, prefix (decode where the prompt's prefix is cached; only the uncached blocks are sent), conditional (prefix, and short uncached prompts are prefilled on the decode worker), mixed (Splitwise's mixed pool: a worker is lent to the other pool while its own is full)."""
    policy_config: PolicyConfig = _sub(PolicyConfig())
    """disagg: the routing policies' settings."""
    worker: WorkerOptions = _sub(WorkerOptions())
    """The workers' settings that are not their engines'."""
    role_controller: bool = False
    """disagg: move workers between the prefill and decode pools when the windowed p90 TTFT or TPOT misses its SLO (--slo-ttft-ms, --slo-tpot-ms) and the other phase has slack."""
    controller: ControllerConfig = _sub(ControllerConfig(), "controller")
    """disagg, --role-controller: its settings."""
    semi_pd_prefill_share: float = 50.0
    """semi-pd: the prefill stream's share of the device in percent at start (CPU: of the torch threads, --num-threads or all cores; GPU: of the SMs); decode gets the rest."""
    semi_pd_controller: bool = True
    """semi-pd: move the split every --semi-pd-window decode steps from the windowed p90 TTFT and TPOT against --slo-ttft-ms and --slo-tpot-ms."""
    semi_pd: SplitControllerConfig = _sub(SplitControllerConfig(), "semi_pd")
    """semi-pd, controller: its settings."""
    slo_ttft_ms: float = 2000.0
    """TTFT SLO for /metrics: a finished request meets the SLOs when its TTFT and its TPOT are both within them (set both to your targets)."""
    slo_tpot_ms: float = 200.0
    """TPOT SLO for /metrics (mean time per output token after the first)."""
    slo_attainment_target: float = 0.9
    """Fraction of requests that should meet the SLOs; exported for dashboards and alert rules."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", as_enum(ServeMode, self.mode, "--mode"))
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError("--prefill-workers and --decode-workers must be at least 1")
        if (self.prefill_tp or 1) < 1 or (self.decode_tp or 1) < 1:
            raise ValueError("--prefill-tp and --decode-tp must be at least 1")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy {self.policy!r} is unknown (choices: {', '.join(POLICIES)})")
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0 or not 0 < self.slo_attainment_target <= 1:
            raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be positive, --slo-attainment-target in (0, 1]")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"--log-level {self.log_level!r} is unknown (choices: {', '.join(LOG_LEVELS)})")
        if not 0 < self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range (1-65535)")
        from scheduler.api.tools import PARSERS
        if self.tool_call_parser not in (*PARSERS, "none"):
            raise ValueError(f"--tool-call-parser {self.tool_call_parser!r} is unknown (choices: {', '.join(PARSERS)}, none)")
        if not 0 < self.semi_pd_prefill_share < 100:
            raise ValueError("--semi-pd-prefill-share must be in (0, 100)")

    def split_controller_or_none(self):
        """Semi-PD's split controller, if asked for."""
        if self.mode != ServeMode.SEMI_PD or not self.semi_pd_controller:
            return None
        from engine.worker.split_controller import SplitController
        return SplitController(self.slo_ttft_ms / 1000, self.slo_tpot_ms / 1000, self.semi_pd,
                               self.semi_pd_prefill_share)

    def role_controller_or_none(self):
        """The role controller to run in the global scheduler, if asked for."""
        if not self.role_controller:
            return None
        from scheduler.controller import RoleController
        return RoleController(self.slo_ttft_ms / 1000, self.slo_tpot_ms / 1000, self.controller)


def _flag_fields(cls: type, prefix: str = ""):
    """(dest name, field, owning class, type hint) of every flag cls contributes, sub-configs flattened."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            sub = f.metadata.get("prefix", "")
            yield from _flag_fields(hints[f.name], "_".join(p for p in (prefix, sub) if p))
        else:
            name = "_".join(p for p in (prefix, f.name) if p)
            yield name, f, cls, hints[f.name]


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    group = parser.add_argument_group(cls.__name__)
    for name, f, owner, hint in _flag_fields(cls):
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next((a for a in args if a is not type(None)), hint)
        flag = "--" + name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        doc = field_help(owner)[f.name].replace("%", "%%")  # argparse formats help with %
        if base is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction, default=default, help=doc)
        elif isinstance(base, type) and issubclass(base, enum.Enum):
            group.add_argument(flag, dest=name, type=str, choices=[m.value for m in base],
                               default=default.value if default is not None else None,
                               help=f"{doc} (default: {default.value if default is not None else None})")
        else:
            group.add_argument(flag, dest=name, type=base, default=default, help=f"{doc} (default: {default})")


def from_args(cls: type, ns: argparse.Namespace, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    values = {}
    for f in fields(cls):
        if is_dataclass(hints[f.name]):
            sub = "_".join(p for p in (prefix, f.metadata.get("prefix", "")) if p)
            values[f.name] = from_args(hints[f.name], ns, sub)
        else:
            values[f.name] = getattr(ns, "_".join(p for p in (prefix, f.name) if p))
    return cls(**values)
