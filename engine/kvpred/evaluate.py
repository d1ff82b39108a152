"""Evaluating a KV predictor: TTFT and FLOPs against full prefill, and quality against two
baselines of the same prefill cost (TECHNIQUES.md, KV prediction).

Four ways to prefill a prompt of L tokens:
- `base`: the base model over the whole prompt (the reference);
- `predicted`: the predictor's K/V for the first L - 1 tokens, the base over the last one;
- `aux`: the auxiliary model alone over the whole prompt, generating with its own head;
- `truncated`: the base over only the prompt's last L' tokens, L' chosen so that its FLOPs
  match predicted prefill's.

Time to first token of base, predicted and truncated is measured through the engine itself
(one request at a time, `whole` schedule, no prefix cache), so it is what serving pays.
Quality is measured on held-out windows of L + continuation tokens, with dense forwards:
- agreement: the base's 32 greedy tokens after the full prompt; each way is teacher-forced
  along them and scored on how many of its top-1 tokens match (1.0 for the base);
- perplexity of the text that follows the prompt in the held-out source, under each way's
  cache.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kvpred.dense import forward_dense, rotate
from engine.kvpred.prefill import PredictedPrefill, forward_flops, predicted_flops
from engine.models.config import ModelConfig

WAYS = ("base", "predicted", "aux", "truncated")


@dataclass(frozen=True)
class EvalConfig:
    prompt_lens: tuple[int, ...] = (128, 512, 2048)
    num_prompts: int = 4      # held-out windows per prompt length (quality)
    gen_tokens: int = 32      # greedy tokens compared with the base's
    text_tokens: int = 64     # held-out tokens after the prompt scored for perplexity
    timing_repeats: int = 3   # TTFT: the median of this many requests per way

    def __post_init__(self) -> None:
        if not self.prompt_lens or min(self.prompt_lens) < 2 or self.num_prompts < 1 or self.gen_tokens < 1 \
                or self.text_tokens < 1 or self.timing_repeats < 1:
            raise ValueError("prompt lengths must be >= 2; prompts, tokens and repeats >= 1")


@dataclass(frozen=True)
class WayResult:
    way: str
    prompt_len: int        # tokens the way's prefill reads (truncated: L')
    flops: float           # its prefill's
    ttft_s: float | None   # measured through the engine (None: not measured, the aux model)
    agreement: float       # top-1 agreement with the base's greedy tokens
    perplexity: float      # of the held-out continuation


def truncated_len(base: ModelConfig, aux: ModelConfig, prompt_len: int) -> int:
    """The longest prompt suffix whose base prefill costs no more than predicted prefill."""
    budget, lo, hi = predicted_flops(base, aux, prompt_len), 1, prompt_len
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if forward_flops(base, mid) <= budget else (lo, mid - 1)
    return lo


def held_out_windows(documents: list[list[int]], length: int, count: int) -> list[list[int]]:
    """Up to count windows of `length` tokens, one per document long enough, spread over them."""
    long_enough = [d for d in documents if len(d) >= length]
    step = max(1, len(long_enough) // count)
    return [d[:length] for d in long_enough[::step][:count]]


class Evaluator:
    def __init__(self, engine, config: EvalConfig):
        """engine: an Engine built with --kv-predictor (its base model and predictor are used)."""
        self.engine, self.config = engine, config
        self.prefill: PredictedPrefill = engine.kv_predictor
        self.base, self.aux = engine.runner.model, self.prefill.predictor.aux
        self._ids = 0

    # time to first token, through the engine

    def ttft(self, prompt: list[int], predicted: bool, repeats: int | None = None) -> float:
        from engine.sampling_params import SamplingParams
        params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True, kv_prediction=predicted)
        times = []
        for _ in range(repeats or self.config.timing_repeats):
            self._ids += 1
            start = time.perf_counter()
            self.engine.add_request(f"eval-{self._ids}", prompt, params)
            while not self.engine.step():
                pass
            times.append(time.perf_counter() - start)
        assert not self.engine.has_unfinished()
        return statistics.median(times)

    # quality, with dense forwards

    @torch.inference_mode()
    def predicted_prefix(self, prompt: torch.Tensor) -> list:
        """The predictor's per-layer (rotated keys, values) of all but the prompt's last token."""
        kv, _ = self.prefill.predictor.predict(prompt[:-1])
        return [(rotate(k, self.base), v) for k, v in kv]

    @torch.inference_mode()
    def logits(self, way: str, prompt: torch.Tensor, after: torch.Tensor, keep: int, prefix: list) -> torch.Tensor:
        """Each way's logits predicting `after` (the tokens following the prompt); prefix: the
        prompt's predicted_prefix (for `predicted`)."""
        L = prompt.shape[0]
        seq = torch.cat([prompt, after[:-1]])
        if way == "aux":
            hidden, _ = forward_dense(self.aux, seq)
            return self.aux.compute_logits(hidden[L - 1:])
        if way == "predicted":
            hidden, _ = forward_dense(self.base, seq[L - 1:], start=L - 1, prefix=prefix)
            return self.base.compute_logits(hidden)
        if way == "truncated":
            seq = torch.cat([prompt[L - keep:], after[:-1]])
            hidden, _ = forward_dense(self.base, seq)
            return self.base.compute_logits(hidden[keep - 1:])
        hidden, _ = forward_dense(self.base, seq)
        return self.base.compute_logits(hidden[L - 1:])

    @torch.inference_mode()
    def base_greedy(self, prompt: torch.Tensor) -> torch.Tensor:
        """The base's greedy continuation (its own KV kept between steps)."""
        hidden, captured = forward_dense(self.base, prompt)
        prefix = [(rotate(k, self.base), v) for k, v in captured]
        out = [int(self.base.compute_logits(hidden[-1:]).argmax())]
        while len(out) < self.config.gen_tokens:
            pos = prompt.shape[0] + len(out) - 1
            hidden, new = forward_dense(self.base, torch.tensor(out[-1:]), start=pos, prefix=prefix)
            prefix = [(torch.cat([pk, rotate(k, self.base, pos)]), torch.cat([pv, v]))
                      for (pk, pv), (k, v) in zip(prefix, new)]
            out.append(int(self.base.compute_logits(hidden[-1:]).argmax()))
        return torch.tensor(out)

    def evaluate(self, documents: list[list[int]]) -> dict[int, list[WayResult]]:
        """Per prompt length, one result per way (in WAYS' order)."""
        cfg, results = self.config, {}
        base_cfg, aux_cfg = self.base.cfg, self.aux.cfg
        for L in cfg.prompt_lens:
            windows = held_out_windows(documents, L + cfg.text_tokens, cfg.num_prompts)
            if not windows:
                raise ValueError(f"no held-out document has {L + cfg.text_tokens} tokens: add data or shorten "
                                 f"--prompt-lens")
            keep = truncated_len(base_cfg, aux_cfg, L)
            agree = {w: [] for w in WAYS}
            nll = {w: [] for w in WAYS}
            for window in map(torch.tensor, windows):
                prompt, text = window[:L], window[L:]
                greedy, prefix = self.base_greedy(prompt), self.predicted_prefix(prompt)  # the prefix: once
                for way in WAYS:
                    agree[way].append(float((self.logits(way, prompt, greedy, keep, prefix).argmax(-1) == greedy)
                                            .float().mean()))
                    nll[way].append(float(F.cross_entropy(self.logits(way, prompt, text, keep, prefix).float(),
                                                          text)))
            prompt = windows[0][:L]
            for predicted in (False, True):  # warm-up: first-call costs are not prefill's
                self.ttft(prompt, predicted, repeats=1)
            ttft = {"base": self.ttft(prompt, False), "predicted": self.ttft(prompt, True),
                    "truncated": self.ttft(prompt[L - keep:], False), "aux": None}
            flops = {"base": forward_flops(base_cfg, L), "predicted": predicted_flops(base_cfg, aux_cfg, L),
                     "aux": forward_flops(aux_cfg, L), "truncated": forward_flops(base_cfg, keep)}
            lens = {"base": L, "predicted": L, "aux": L, "truncated": keep}
            results[L] = [WayResult(w, lens[w], flops[w], ttft[w], statistics.mean(agree[w]),
                                    math.exp(statistics.mean(nll[w]))) for w in WAYS]
        return results
