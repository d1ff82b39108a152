"""Per-request sampling settings, validated once on construction (vLLM-shaped)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import RequestError
from engine.structured_output import StructuredOutput

MAX_N = 8
MAX_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_TOKEN_LISTS = 1024  # logit_bias entries, allowed_token_ids, bad-word token sequences: at most this many
LOGIT_BIAS_LIMIT = 100.0  # biases are clamped to [-100, 100] (OpenAI's range)
INT32_MAX = 2**31 - 1  # token ids and top_k travel as int32 between workers
UINT32_MAX = 2**32 - 1  # max_tokens and min_tokens as uint32
SEED_MIN, SEED_MAX = -2**63, 2**63 - 1  # int64; the n samples' seeds (seed + index) too


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # logprobs of each prompt token given those before it (and this many alternatives)
    skip_special_tokens: bool = True
    kv_prediction: bool | None = None  # predicted prefill (KV prediction): None lets the server's policy choose
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit), a dict is accepted
    allowed_token_ids: tuple[int, ...] = ()  # when set, only these tokens may be sampled
    bad_words_ids: tuple[tuple[int, ...], ...] = ()  # token sequences never completed (the last one is masked)
    structured: StructuredOutput | None = None  # what the output must match (constrained decoding)
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop or ()))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids or ()))
        self._token_lists()
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
                   f"{name} must be a finite number", name)
        for name in ("ignore_eos", "skip_special_tokens"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false", name)
        _check(self.kv_prediction is None or isinstance(self.kv_prediction, bool),
               "kv_prediction must be true, false or unset", "kv_prediction")
        _check(_int(self.n) and 1 <= self.n <= MAX_N, f"n must be between 1 and {MAX_N}", "n")
        _check(self.max_tokens is None or (_int(self.max_tokens) and 1 <= self.max_tokens <= UINT32_MAX),
               "max_tokens must be at least 1", "max_tokens")
        _check(_int(self.min_tokens) and 0 <= self.min_tokens <= UINT32_MAX, "min_tokens must be >= 0", "min_tokens")
        _check(self.seed is None or (_int(self.seed) and SEED_MIN <= self.seed <= SEED_MAX - (self.n - 1)),
               f"seed must be an integer in [{SEED_MIN}, {SEED_MAX - (self.n - 1)}]", "seed")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               "min_tokens must not exceed max_tokens", "min_tokens")
        _check(self.temperature >= 0, "temperature must be >= 0", "temperature")
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", "top_p")
        _check(_int(self.top_k) and 0 <= self.top_k <= INT32_MAX, "top_k must be -1, 0 (off) or positive", "top_k")
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", "min_p")
        _check(self.repetition_penalty > 0, "repetition_penalty must be > 0", "repetition_penalty")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty must be in [-2, 2]", "presence_penalty")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty must be in [-2, 2]", "frequency_penalty")
        _check(self.logprobs is None or (_int(self.logprobs) and 0 <= self.logprobs <= MAX_LOGPROBS),
               f"logprobs must be between 0 and {MAX_LOGPROBS}", "logprobs")
        _check(self.prompt_logprobs is None or (_int(self.prompt_logprobs) and 0 <= self.prompt_logprobs <= MAX_LOGPROBS),
               f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}", "prompt_logprobs")
        _check(len(self.stop) <= MAX_STOP_STRINGS and all(isinstance(s, str) and s for s in self.stop),
               f"stop must be at most {MAX_STOP_STRINGS} non-empty strings", "stop")
        _check(all(_int(t) and 0 <= t <= INT32_MAX for t in self.stop_token_ids),
               "stop_token_ids must be non-negative integers", "stop_token_ids")

    def _token_lists(self) -> None:
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias or ()
        try:
            bias = tuple(sorted((t, max(-LOGIT_BIAS_LIMIT, min(LOGIT_BIAS_LIMIT, float(b)))) for t, b in bias))
        except (TypeError, ValueError):
            raise RequestError("logit_bias maps token ids to numbers", param="logit_bias") from None
        object.__setattr__(self, "logit_bias", bias)
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids or ()))
        object.__setattr__(self, "bad_words_ids", tuple(tuple(w) for w in self.bad_words_ids or ()))
        for name, ids in (("logit_bias", [t for t, _ in bias]), ("allowed_token_ids", self.allowed_token_ids),
                          ("bad_words", [t for w in self.bad_words_ids for t in w])):
            _check(all(_int(t) and 0 <= t <= INT32_MAX for t in ids), f"{name}: token ids must be non-negative integers",
                   name)
        _check(all(math.isfinite(b) for _, b in bias), "logit_bias values must be finite numbers", "logit_bias")
        for name, n in (("logit_bias", len(bias)), ("allowed_token_ids", len(self.allowed_token_ids)),
                        ("bad_words", len(self.bad_words_ids))):
            _check(n <= MAX_TOKEN_LISTS, f"{name}: at most {MAX_TOKEN_LISTS} entries", name)
        _check(all(self.bad_words_ids), "bad_words entries must not be empty", "bad_words")
        _check(self.structured is None or isinstance(self.structured, StructuredOutput),
               "structured must be a StructuredOutput", "structured_outputs")

    @property
    def shapes_logits(self) -> bool:
        """Whether sampling changes this row's logits before it draws (penalties aside)."""
        return bool(self.logit_bias or self.allowed_token_ids or self.bad_words_ids or self.structured)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    def for_child(self, index: int) -> "SamplingParams":
        """Params of the index-th of n parallel samples: n=1, a distinct but reproducible seed."""
        from dataclasses import replace
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, message: str, param: str) -> None:
    if not ok:
        raise RequestError(message, param=param)
