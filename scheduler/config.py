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
    mode: str = "colocated"
    """Serving mode: colocated (one engine does prefill and decode)."""
    host: str = "127.0.0.1"
    """Address to bind the HTTP server to."""
    port: int = 8000
    """Port of the HTTP server."""
    api_key: str | None = None
    """If set, /v1 requests must send Authorization: Bearer <key>."""
    log_level: str = "info"
    """Log level of the server (debug, info, warning, error)."""

    def __post_init__(self) -> None:
        if self.mode not in ("colocated",):
            raise ValueError(f"--mode {self.mode!r} is not available (choices: colocated)")




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
