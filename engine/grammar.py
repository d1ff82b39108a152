"""Constrained decoding for our engine, with xgrammar.

`Grammars` compiles a request's StructuredOutput against the model's tokenizer (once per
distinct constraint: xgrammar caches compiled grammars) and hands out one matcher per
sampled sequence. The tokenizer and xgrammar's compiler are loaded on the first
constrained request, so an engine that never sees one pays nothing. Compiling runs where
the request is validated (the caller's thread), never in the step loop; a constraint
xgrammar refuses is a RequestError naming the problem.

JSON is generated with xgrammar's fixed separators (no free whitespace between tokens): a
small model given free whitespace can spend its whole budget on newlines.

Per step the sampler asks each constrained row's matcher for its token bitmask, applies
the bitmasks to those rows only, and feeds the sampled token back (`accept`).
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from engine.errors import RequestError
from engine.structured_output import StructuredKind, StructuredOutput

_XGRAMMAR_PREFIX = re.compile(r"^\[[0-9:]+\] \S+\.cc:\d+: (Check failed: \(.*?\) is false: )?")


class Grammars:
    def __init__(self, model_path: Path, vocab_size: int, stop_token_ids: tuple[int, ...]):
        self.model_path, self.vocab_size, self.stop_token_ids = model_path, vocab_size, stop_token_ids
        self._lock = threading.Lock()
        self._compiler = None

    def _get_compiler(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                from scheduler.tokenizer import Tokenizer
                hf = Tokenizer.load(self.model_path).hf
                info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=self.vocab_size,
                                                          stop_token_ids=list(self.stop_token_ids))
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def compile(self, spec: StructuredOutput):
        """The compiled grammar; RequestError when the constraint is not valid."""
        compiler = self._get_compiler()
        try:
            if spec.kind == StructuredKind.JSON:
                return compiler.compile_json_schema(spec.spec, any_whitespace=False, strict_mode=True)
            if spec.kind == StructuredKind.JSON_OBJECT:
                return compiler.compile_builtin_json_grammar()
            if spec.kind == StructuredKind.REGEX:
                return compiler.compile_regex(spec.spec)
            if spec.kind == StructuredKind.CHOICE:
                return compiler.compile_regex("|".join(re.escape(c) for c in spec.choices))
            return compiler.compile_grammar(spec.spec)
        except (RuntimeError, ValueError) as e:
            message = _XGRAMMAR_PREFIX.sub("", str(e).strip()).split("\n")[0]
            raise RequestError(f"invalid {spec.kind.value} constraint: {message}", param="structured_outputs") from None

    def matcher(self, spec: StructuredOutput, output_token_ids: list[int]) -> "Matcher":
        """A matcher for one sequence, past the tokens it has already produced (a decode engine
        continues from the prefill engine's first token)."""
        import xgrammar as xgr
        matcher = Matcher(xgr.GrammarMatcher(self.compile(spec)), self.vocab_size)
        for token in output_token_ids:
            if not matcher.accept(token):
                raise RuntimeError(f"token {token} produced earlier does not match the constraint")
        return matcher


class Matcher:
    def __init__(self, matcher, vocab_size: int):
        self._m, self.vocab_size = matcher, vocab_size

    def accept(self, token_id: int) -> bool:
        return self._m.accept_token(token_id)

    @property
    def terminated(self) -> bool:
        return self._m.is_terminated()

    def fill(self, bitmask: torch.Tensor, row: int) -> None:
        self._m.fill_next_token_bitmask(bitmask, row)


def apply_bitmasks(logits: torch.Tensor, matchers: dict[int, Matcher]) -> None:
    """Masks, in place, each row of logits that has a matcher to the tokens its grammar allows."""
    import xgrammar as xgr
    rows = sorted(matchers)
    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[-1])
    for row in rows:
        matchers[row].fill(bitmask, row)
    xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=logits.shape[-1], indices=rows)
