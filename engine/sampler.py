"""Token sampling for one step's batch of rows, one row per sampling request.

Order per row: logprobs of the raw model distribution (if asked); repetition / presence /
frequency penalties; allowed_token_ids, logit_bias and bad words; min_tokens masks the stop
tokens; a structured-output row is masked to what its grammar allows (engine/grammar.py),
and its grammar then advances by the token drawn; greedy rows take the argmax;
the rest are scaled by temperature, filtered by top_k, top_p and min_p, and drawn with
the request's own generator (seeded per request, so a seed reproduces its output
whatever else shares the batch). A row whose own filters and constraint leave no token at
all (bad_words over every choice of a guided_choice, say) is refused, not drawn from nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.grammar import Grammars, Matcher, apply_bitmasks
from engine.request import Request, TokenLogprobs

log = logging.getLogger(__name__)


@dataclass
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    errors: dict[int, str] = field(default_factory=dict)  # row -> why that row failed (its token is void)
    refused: set[int] = field(default_factory=set)  # rows of `errors` failed by their own parameters (HTTP 400)
    completed: set[int] = field(default_factory=set)  # rows whose grammar is complete with this token: they stop


class Sampler:
    def __init__(self, device: torch.device, seed: int, grammars: Grammars | None = None):
        self.device = device
        self.seed = seed
        self.grammars = grammars
        self._seeder = torch.Generator().manual_seed(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._matchers: dict[str, Matcher] = {}

    def release(self, request_id: str) -> None:
        self._generators.pop(request_id, None)
        self._matchers.pop(request_id, None)

    def _matcher(self, request: Request) -> Matcher:
        m = self._matchers.get(request.request_id)
        if m is None:
            if self.grammars is None:
                raise RuntimeError("this engine has no grammar support")
            m = self._matchers[request.request_id] = self.grammars.matcher(request.params.structured,
                                                                           request.output_token_ids)
        return m

    def _generator(self, request: Request) -> torch.Generator:
        gen = self._generators.get(request.request_id)
        if gen is None:
            seed = request.params.seed
            if seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeder))
            gen = torch.Generator(device=self.device).manual_seed(seed)
            self._generators[request.request_id] = gen
        return gen

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits: [len(requests), vocab] float32. A row whose own set-up raises (penalties,
        stop-token mask, generator) is reported in `errors` and sampled greedily from its raw
        logits; the other rows are unaffected."""
        params = [r.params for r in requests]
        raw_logprobs = None
        if any(p.logprobs is not None for p in params):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if any(p.has_penalties or p.shapes_logits for p in params):
            logits = logits.clone()
        errors: dict[int, str] = {}
        generators: dict[int, torch.Generator] = {}
        matchers: dict[int, Matcher] = {}
        for row, r in enumerate(requests):
            try:
                self._prepare_row(logits[row], r)
                if r.params.structured is not None:
                    matchers[row] = self._matcher(r)
                if not r.params.greedy:
                    generators[row] = self._generator(r)
            except Exception as e:  # this request's values; the batch goes on without it
                log.exception("sampling set-up failed for request %s", r.request_id)
                errors[row] = f"sampling set-up failed: {type(e).__name__}: {e}"
                matchers.pop(row, None)
        if matchers:
            apply_bitmasks(logits, matchers)
        refused = set()
        if matchers or any(p.shapes_logits for p in params):
            for row in torch.isneginf(logits).all(dim=-1).nonzero().flatten().tolist():
                if row not in errors:
                    refused.add(row)
                    errors[row] = ("no token is left to sample: the request's allowed_token_ids, bad_words, "
                                   "min_tokens and output constraint together allow none")
                    matchers.pop(row, None)
                    generators.pop(row, None)
        tokens = logits.argmax(dim=-1)
        random_rows = list(generators)
        if random_rows:
            sub = logits[random_rows]
            probs = _filtered_probs(sub, [params[i] for i in random_rows])
            for j, row in enumerate(random_rows):
                noise = torch.empty_like(probs[j]).exponential_(generator=generators[row])
                tokens[row] = (probs[j] / noise).argmax()
        token_ids = tokens.tolist()
        completed = set()
        for row, matcher in matchers.items():
            if not matcher.accept(token_ids[row]):
                errors[row] = "no token the output constraint allows could be sampled"
            elif matcher.terminated:
                completed.add(row)
        out: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            for row, p in enumerate(params):
                if p.logprobs is None or row in errors:
                    continue
                tok = token_ids[row]
                top: list[tuple[int, float]] = []
                if p.logprobs > 0:
                    vals, ids = raw_logprobs[row].topk(p.logprobs)
                    top = list(zip(ids.tolist(), vals.tolist()))
                out[row] = TokenLogprobs(tok, float(raw_logprobs[row, tok]), top)
        return SampleResult(token_ids, out, errors, refused=refused, completed=completed)

    @staticmethod
    def _prepare_row(row: torch.Tensor, request: Request) -> None:
        """Penalties, token filters and biases, then min_tokens' mask of the stop tokens, in
        place on the row's logits."""
        p = request.params
        if p.has_penalties:
            _apply_penalties(row, request)
        if p.allowed_token_ids:
            keep = torch.tensor(p.allowed_token_ids, device=row.device, dtype=torch.long)
            kept = row[keep]
            row.fill_(float("-inf"))
            row[keep] = kept
        if p.logit_bias:
            ids = torch.tensor([t for t, _ in p.logit_bias], device=row.device, dtype=torch.long)
            row[ids] += torch.tensor([b for _, b in p.logit_bias], device=row.device, dtype=row.dtype)
        if p.bad_words_ids:
            out = request.output_token_ids
            banned = [w[-1] for w in p.bad_words_ids if len(w) == 1 or out[len(out) - len(w) + 1:] == list(w[:-1])]
            if banned:
                row[banned] = float("-inf")
        if request.num_output_tokens < p.min_tokens:
            blocked = list(p.stop_token_ids) + ([] if p.ignore_eos else list(request.eos_token_ids))
            if blocked:
                row[blocked] = float("-inf")


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    p = request.params
    device = row.device
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(request.all_token_ids)), device=device, dtype=torch.long)
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and request.num_output_tokens:
        out = torch.tensor(request.output_token_ids, device=device, dtype=torch.long)
        counts = torch.zeros_like(row).scatter_add_(0, out, torch.ones_like(out, dtype=row.dtype))
        row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)


def _filtered_probs(logits: torch.Tensor, params: list) -> torch.Tensor:
    temps = torch.tensor([p.temperature for p in params], device=logits.device, dtype=logits.dtype)
    logits = logits / temps[:, None]
    top_k = [p.top_k for p in params]
    if any(top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([min(t, vocab) if t else vocab for t in top_k], device=logits.device)
        sorted_vals = logits.sort(dim=-1, descending=True).values
        kth = sorted_vals.gather(1, (k - 1)[:, None])
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=logits.device, dtype=probs.dtype)
    if bool((top_p < 1).any()):
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = torch.tensor([p.min_p for p in params], device=logits.device, dtype=probs.dtype)
    if bool((min_p > 0).any()):
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)
