"""Process configuration for `pdserve serve`: the engine's config plus the front door's.

Flags are generated from the dataclass fields (same names, dashes for underscores) with
each field's docstring as help, so `--max-num-seqs` is `EngineConfig.max_num_seqs`.
"""

from __future__ import annotations

import argparse
import types
import typing
from dataclasses import MISSING, dataclass, fields

from engine.config import field_help


@dataclass(frozen=True)
class ServeConfig:
    mode: str = "disagg"
    """Serving mode: disagg (prefill and decode worker pools on Ray, KV shipped layer by layer), colocated (one engine in this process does both) or semi-pd (one process, prefill and decode as two concurrent streams over one KV pool, each on its share of the device)."""
    host: str = "127.0.0.1"
    """Address to bind the HTTP server to."""
    port: int = 8000
    """Port of the HTTP server."""
    api_key: str | None = None
    """If set, /v1 requests must send Authorization: Bearer <key>."""
    log_level: str = "info"
    """Log level of the server (debug, info, warning, error)."""
    prefill_workers: int = 1
    """disagg: number of prefill worker actors (one GPU each, or a share of the CPU cores)."""
    decode_workers: int = 1
    """disagg: number of decode worker actors."""
    ray_address: str | None = None
    """disagg: address of a running Ray cluster to join (e.g. 10.0.0.1:6379); default: start one on this machine."""
    policy: str = "jsq"
    """disagg: routing policy: jsq (prefill by pending prompt tokens, decode by free KV blocks), round-robin, prefix (decode where the prompt's prefix is cached; only the uncached blocks are sent), conditional (prefix, and short uncached prompts are prefilled on the decode worker), mixed (Splitwise's mixed pool: a worker is lent to the other pool while its own is full)."""
    local_prefill_tokens: int = 2048
    """disagg, --policy conditional: prompts whose uncached part is shorter than this are prefilled on the decode worker."""
    prefill_full_tokens: int = 8192
    """disagg, --policy conditional/mixed: a prefill worker is full when its pending prompt tokens plus the prompt's exceed this."""
    role_controller: bool = False
    """disagg: move workers between the prefill and decode pools when the windowed p90 TTFT or TPOT misses its SLO (--slo-ttft-ms, --slo-tpot-ms) and the other phase has slack."""
    controller_window_s: float = 20.0
    """disagg, --role-controller: seconds of finished requests per decision (a worker moves after 2 such windows agree)."""
    max_waiting_for_blocks: int = 64
    """disagg: requests a decode worker queues while it has no KV blocks for them; beyond that, 503 with Retry-After."""
    transfer_timeout_s: float = 30.0
    """disagg: a request whose prompt KV makes no progress this long fails: no chunk landed, and its prefill worker did not show it working on the request (queued or computing) within 5 s of being asked."""
    semi_pd_prefill_share: float = 50.0
    """semi-pd: the prefill stream's share of the device in percent at start (CPU: of the torch threads, --num-threads or all cores; GPU: of the SMs); decode gets the rest."""
    semi_pd_controller: bool = True
    """semi-pd: move the split every --semi-pd-window decode steps from the windowed p90 TTFT and TPOT against --slo-ttft-ms and --slo-tpot-ms."""
    semi_pd_window: int = 200
    """semi-pd, controller: decode steps per decision."""
    slo_ttft_ms: float = 2000.0
    """TTFT SLO for /metrics: a finished request meets the SLOs when its TTFT and its TPOT are both within them (set both to your targets)."""
    slo_tpot_ms: float = 200.0
    """TPOT SLO for /metrics (mean time per output token after the first)."""
    slo_attainment_target: float = 0.9
    """Fraction of requests that should meet the SLOs; exported for dashboards and alert rules."""

    def __post_init__(self) -> None:
        from scheduler.policies import POLICIES
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} is not available (choices: {', '.join(MODES)})")
        if self.prefill_workers < 1 or self.decode_workers < 1:
            raise ValueError("--prefill-workers and --decode-workers must be at least 1")
        if self.policy not in POLICIES:
            raise ValueError(f"--policy {self.policy!r} is unknown (choices: {', '.join(POLICIES)})")
        if self.max_waiting_for_blocks < 0 or self.transfer_timeout_s <= 0:
            raise ValueError("--max-waiting-for-blocks must be >= 0 and --transfer-timeout-s positive")
        if self.slo_ttft_ms <= 0 or self.slo_tpot_ms <= 0 or not 0 < self.slo_attainment_target <= 1:
            raise ValueError("--slo-ttft-ms and --slo-tpot-ms must be positive, --slo-attainment-target in (0, 1]")
        if self.local_prefill_tokens < 0 or self.prefill_full_tokens < 1 or self.controller_window_s <= 0:
            raise ValueError("--local-prefill-tokens must be >= 0, --prefill-full-tokens and "
                             "--controller-window-s positive")

        if not 0 < self.semi_pd_prefill_share < 100 or self.semi_pd_window < 1:
            raise ValueError("--semi-pd-prefill-share must be in (0, 100) and --semi-pd-window at least 1")

    def policy_config(self):
        from scheduler.policies import PolicyConfig
        return PolicyConfig(self.local_prefill_tokens, self.prefill_full_tokens)

    def split_controller_or_none(self):
        """Semi-PD's split controller, if asked for."""
        if self.mode != "semi-pd" or not self.semi_pd_controller:
            return None
        from engine.split_controller import SplitController, SplitControllerConfig
        return SplitController(self.slo_ttft_ms / 1000, self.slo_tpot_ms / 1000,
                               SplitControllerConfig(window=self.semi_pd_window), self.semi_pd_prefill_share)

    def role_controller_or_none(self):
        """The role controller to run in the global scheduler, if asked for."""
        if not self.role_controller:
            return None
        from scheduler.controller import ControllerConfig, RoleController
        return RoleController(self.slo_ttft_ms / 1000, self.slo_tpot_ms / 1000,
                              ControllerConfig(window_s=self.controller_window_s))


MODES = ("disagg", "colocated", "semi-pd")



def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    hints = typing.get_type_hints(cls)
    docs = field_help(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in fields(cls):
        hint = hints[f.name]
        args = typing.get_args(hint) if isinstance(hint, types.UnionType) else ()
        base = next((a for a in args if a is not type(None)), hint)
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        if base is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=docs[f.name])
        else:
            group.add_argument(flag, type=base, default=default, help=f"{docs[f.name]} (default: {default})")


def from_args(cls: type, ns: argparse.Namespace):
    return cls(**{f.name: getattr(ns, f.name) for f in fields(cls)})
