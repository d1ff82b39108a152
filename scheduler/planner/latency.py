"""DistServe's latency model, fitted from a profile (no torch).

A prefill batch of prompts with lengths l_i takes `a + b * sum(l_i) + c * sum(l_i^2)`
seconds (linear layers, then attention's quadratic term); a decode step over requests with
context lengths c_j takes `a + b * sum(c_j) + c * batch` (reading each request's KV, then
per-request work), fitted separately for small and large batches as DistServe does.
Coefficients are fitted by least squares and kept non-negative (a term that would come out
negative is dropped and the rest refitted), and each fit carries its R^2.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Fit:
    coef: tuple[float, float, float]  # seconds: constant, per unit of the 2nd feature, of the 3rd
    r2: float
    num_points: int

    def __call__(self, x1: float, x2: float) -> float:
        a, b, c = self.coef
        return a + b * x1 + c * x2


def fit_linear(features: Sequence[tuple[float, float]], seconds: Sequence[float]) -> Fit:
    """Least squares of seconds on [1, x1, x2], coefficients >= 0. One outlier pass: points off
    the fit by more than 4 robust standard deviations (1.4826 x the median absolute residual)
    and by more than 25 % of their own time (a measurement hit by a noisy neighbour) are
    dropped and the rest refitted; num_points counts the points kept."""
    x = np.column_stack([np.ones(len(features)), np.asarray(features, dtype=float)])
    y = np.asarray(seconds, dtype=float)
    if len(y) < 3:
        raise ValueError(f"a fit needs at least 3 points, got {len(y)}")
    coef = _nonnegative_lstsq(x, y)
    residual = np.abs(y - x @ coef)
    keep = ~((residual > 4 * 1.4826 * np.median(residual)) & (residual > 0.25 * y))
    if 3 <= keep.sum() < len(y):
        x, y = x[keep], y[keep]
        coef = _nonnegative_lstsq(x, y)
    residual = y - x @ coef
    total = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else 1.0
    return Fit((float(coef[0]), float(coef[1]), float(coef[2])), float(r2), len(y))


def _nonnegative_lstsq(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    active = [0, 1, 2]
    while True:
        solved, *_ = np.linalg.lstsq(x[:, active], y, rcond=None)
        if (solved >= 0).all() or len(active) == 1:
            break
        active.pop(int(np.argmin(solved)))  # the most negative term leaves
    coef = np.zeros(3)
    coef[active] = np.maximum(solved, 0)
    return coef


def prefill_features(lengths: Sequence[int]) -> tuple[float, float]:
    return float(sum(lengths)), float(sum(n * n for n in lengths))


def decode_features(contexts: Sequence[int]) -> tuple[float, float]:
    return float(sum(contexts)), float(len(contexts))


@dataclass(frozen=True)
class LatencyModel:
    prefill: Fit
    decode_small: Fit
    decode_large: Fit
    large_batch_from: int  # decode batches this size or larger use decode_large

    def prefill_s(self, lengths: Sequence[int]) -> float:
        return self.prefill(*prefill_features(lengths)) if lengths else 0.0

    def _decode_fit(self, batch: int) -> Fit:
        return self.decode_large if batch >= self.large_batch_from else self.decode_small

    def decode_s(self, contexts: Sequence[int]) -> float:
        return self._decode_fit(len(contexts))(*decode_features(contexts)) if contexts else 0.0

    def step_s(self, chunks: Sequence[tuple[int, int]], contexts: Sequence[int],
               cohort: Sequence[tuple[int, int]] = (), cohort_layers: float = 0.0) -> float:
        """One engine step computing prefill chunks (start, new tokens) and decodes (context
        lengths). A chunk's attention term is new * (start + new), a whole prompt's l^2; a
        mixed step pays the fixed cost once. cohort: layered prefill's chunks, through a
        cohort_layers fraction of the layers (their per-token work scales with it)."""
        prefill = self.prefill(sum(n for _, n in chunks), sum(n * (s + n) for s, n in chunks)) if chunks else 0.0
        if cohort:
            fixed = self.prefill.coef[0]
            work = self.prefill(sum(n for _, n in cohort), sum(n * (s + n) for s, n in cohort)) - fixed
            prefill += cohort_layers * work + (0.0 if chunks else fixed)
        if not contexts:
            return prefill
        decode = self.decode_s(contexts)
        if not chunks and not cohort:
            return decode
        return prefill + decode - min(self.prefill.coef[0], self._decode_fit(len(contexts)).coef[0])


@dataclass(frozen=True)
class PrefillSample:
    lengths: tuple[int, ...]
    seconds: float


@dataclass(frozen=True)
class DecodeSample:
    contexts: tuple[int, ...]
    seconds: float


def fit_model(prefill: Sequence[PrefillSample], decode: Sequence[DecodeSample],
              large_batch_from: int = 16) -> LatencyModel:
    p = fit_linear([prefill_features(s.lengths) for s in prefill], [s.seconds for s in prefill])
    small = [s for s in decode if len(s.contexts) < large_batch_from]
    large = [s for s in decode if len(s.contexts) >= large_batch_from]
    if len(small) < 3 or len(large) < 3:  # not enough of one kind: one fit for both
        small = large = list(decode)
    d_small = fit_linear([decode_features(s.contexts) for s in small], [s.seconds for s in small])
    d_large = d_small if large is small else fit_linear([decode_features(s.contexts) for s in large],
                                                        [s.seconds for s in large])
    return LatencyModel(p, d_small, d_large, large_batch_from)


@dataclass(frozen=True)
class Profile:
    """What `pdserve profile` measured on one machine for one model, and its fits."""

    model: str
    device: str
    dtype: str
    num_threads: int
    block_size: int
    kv_bytes_per_token: int
    prefill_samples: tuple[PrefillSample, ...]
    decode_samples: tuple[DecodeSample, ...]
    latency: LatencyModel
    hardware: str = ""
    command: str = ""
    notes: dict[str, str] = field(default_factory=dict)
    transfer_gbps: float | None = None  # KV transfer between two workers on one node (Gb/s); None: not measured
    device_memory_bytes: int = 0  # per device; 0: unknown (no tensor-parallel sizing)
    weight_bytes: int = 0
    num_kv_blocks: int = 0  # the engine's KV blocks per worker when the memory figures are unknown
    max_num_seqs: int = 0  # the engine's batch limits the planner simulates (0: the simulator's defaults)
    max_num_batched_tokens: int = 0
    num_layers: int = 0  # the model's (layered prefill's groups); 0: unknown, taken as 32

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"

    def transfer_s_per_token(self, gbps: float | None = None) -> float:
        """Seconds one token's KV takes at gbps (default: the measured link); 0 when unknown."""
        gbps = gbps or self.transfer_gbps
        return self.kv_bytes_per_token / (gbps * 1e9 / 8) if gbps else 0.0

    @classmethod
    def from_dict(cls, d: dict) -> Profile:
        fit = lambda f: Fit(tuple(f["coef"]), f["r2"], f["num_points"])  # noqa: E731
        lat = d["latency"]
        return cls(**{**d,
                      "prefill_samples": tuple(PrefillSample(tuple(s["lengths"]), s["seconds"])
                                               for s in d["prefill_samples"]),
                      "decode_samples": tuple(DecodeSample(tuple(s["contexts"]), s["seconds"])
                                              for s in d["decode_samples"]),
                      "latency": LatencyModel(fit(lat["prefill"]), fit(lat["decode_small"]),
                                              fit(lat["decode_large"]), lat["large_batch_from"])})

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        return cls.from_dict(json.loads(Path(path).read_text()))
