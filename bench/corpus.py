"""Real text for prompts, offline: English prose from the Python standard library's
docstrings and Python code from its sources. Both ship with every Python, so a prompt is
the same text on every machine for a given seed.

A prompt of N tokens is a window of the corpus. With the target's tokenizer the window is
cut in token ids and its length re-counted on the decoded text; without one the length is
estimated at 4 characters per token (`TokenCounter.exact` says which).
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

Kind = Literal["prose", "code"]
CHARS_PER_TOKEN = 4  # the usual rule of thumb for English BPE vocabularies
_MAX_CODE_CHARS = 400_000  # enough windows; keeps tokenizing the corpus to about a second

_MODULES = ("argparse", "asyncio.events", "asyncio.tasks", "collections", "concurrent.futures._base", "csv",
            "dataclasses", "datetime", "decimal", "difflib", "email.message", "fractions", "ftplib",
            "functools", "http.client", "http.server", "inspect", "ipaddress", "json", "logging",
            "mailbox", "pathlib", "pickle", "random", "shutil", "smtplib", "socket", "statistics",
            "string", "subprocess", "tarfile", "textwrap", "threading", "typing", "unittest.case",
            "urllib.parse", "urllib.request", "uuid", "zipfile")


@cache
def corpus_text(kind: Kind) -> str:
    parts: list[str] = []
    for name in _MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # a stdlib module left out of this build of Python
            continue
        if kind == "code":
            parts.append(inspect.getsource(module))
            if sum(map(len, parts)) > _MAX_CODE_CHARS:
                break
            continue
        for obj in [module, *(v for _, v in sorted(vars(module).items()))]:
            own = obj is module or getattr(obj, "__module__", None) == module.__name__
            doc = obj.__doc__ if own and (inspect.isclass(obj) or inspect.isroutine(obj) or obj is module) else None
            if isinstance(doc, str) and len(doc) > 200 and (text := _prose(inspect.cleandoc(doc))) not in parts:
                parts.append(text)
    return "\n\n".join(parts)


def _prose(doc: str) -> str:
    """Docstring paragraphs without doctests, indented code, or table rules and columns."""
    lines = [re.sub(r" {2,}", " ", ln) for ln in doc.splitlines()
             if not ln.startswith((">>>", "...", "    ")) and not _mostly_symbols(ln)]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _mostly_symbols(line: str) -> bool:
    return len(line) > 3 and sum(c.isalpha() for c in line) < len(line) / 2


@dataclass
class TokenCounter:
    """Counts tokens with the target's tokenizer, or estimates them when there is none."""

    tokenizer: object | None = None  # a transformers tokenizer

    @property
    def exact(self) -> bool:
        return self.tokenizer is not None

    def count(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, round(len(text) / CHARS_PER_TOKEN))
        return len(self.tokenizer.encode(text, add_special_tokens=True))  # as the server counts a prompt

    @classmethod
    def load(cls, path: str | None) -> "TokenCounter":
        """path: an HF tokenizer folder, or a GGUF file (its tokenizer, converted by transformers)."""
        if not path:
            return cls(None)
        from transformers import AutoTokenizer
        p = Path(path)
        if p.suffix == ".gguf":
            return cls(AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name))
        return cls(AutoTokenizer.from_pretrained(p))


class TextSource:
    """Windows of real text of a requested token length."""

    def __init__(self, kind: Kind, counter: TokenCounter):
        self.text = corpus_text(kind)
        self.counter = counter
        self._ids = counter.tokenizer.encode(self.text, add_special_tokens=False) if counter.exact else None

    def window(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        """(text, its token count); the count is exact with a tokenizer, else estimated."""
        num_tokens = max(1, num_tokens)
        if self._ids is None:
            return self._char_window(num_tokens * CHARS_PER_TOKEN, rng), num_tokens
        want, text = num_tokens, ""
        for _ in range(3):  # decoding then re-encoding can merge or split a token at the seams
            ids = self._cycle(self._ids, rng.randrange(len(self._ids)), want)
            text = self.counter.tokenizer.decode(ids, skip_special_tokens=True)
            got = self.counter.count(text)
            if got == num_tokens:
                break
            want = max(1, want + num_tokens - got)
        return text, self.counter.count(text)

    def _char_window(self, num_chars: int, rng: random.Random) -> str:
        start = rng.randrange(len(self.text))
        start = self.text.find(" ", start) + 1  # start on a word
        return self._cycle(self.text, start, num_chars).strip() or self.text[:num_chars]

    @staticmethod
    def _cycle(seq, start: int, length: int):
        """seq[start:start+length], wrapping around to the start as often as needed."""
        out = seq[start:start + length]
        while len(out) < length:
            out += seq[:length - len(out)]
        return out
