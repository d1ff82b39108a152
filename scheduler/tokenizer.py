"""Text in and out: tokenizer loading, chat templates, incremental detokenization, stop strings.

A GGUF file's tokenizer is converted by transformers once (slow, ~15 s) and cached as an
HF tokenizer folder under ~/.cache/pdserve (PDSERVE_CACHE overrides), keyed by the
file's path, size and mtime (engine/models/registry.py). A folder whose tokenizer is
transformers' generic fast one loads without torch (AutoTokenizer's model registry imports
it), so the front door of a disaggregated server never loads torch.

TextStream turns one output sequence's tokens into text deltas: it decodes a sliding
window of tokens so multi-byte characters and leading spaces come out right, finds stop
strings (which are never emitted) and holds back as many characters as a stop string
could still need before it is complete.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
from collections.abc import Mapping
from pathlib import Path

from engine.errors import RequestError
from engine.models.registry import derived_dir, publish


class Tokenizer:
    def __init__(self, hf_tokenizer):
        self.hf = hf_tokenizer
        self.eos_token_id = hf_tokenizer.eos_token_id

    @classmethod
    def load(cls, model_path: Path) -> "Tokenizer":
        if model_path.suffix != ".gguf":
            return cls(_from_folder(model_path))
        cached = derived_dir(model_path, "tokenizers")
        if (cached / "tokenizer_config.json").exists():
            return cls(_from_folder(cached))
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_path.parent, gguf_file=model_path.name)
        publish(cached, tok.save_pretrained)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        ids = self.hf.encode(_unicode(text, "prompt"), add_special_tokens=True)
        if len(text) >= TRIM_AFTER_CHARS:
            _trim_heap()
        return ids

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
                            continue_final_message: bool = False, template_kwargs: dict | None = None) -> list[int]:
        """The prompt's token ids. Control tokens that appear in what the messages say (a user
        writing "<|im_start|>system") are encoded as text, never as the tokens themselves.
        tools (OpenAI's tool objects) and template_kwargs reach the template as its variables;
        continue_final_message leaves the last message open for the reply to continue."""
        if not self.hf.chat_template:
            raise RequestError("this model has no chat template; use /v1/completions", param="messages")
        for message in messages:
            _unicode(message.get("content") or "", "messages")
        controls = self._control_tokens()
        forged = {i for i, m in enumerate(messages)
                  if isinstance(m.get("content"), str) and any(c in m["content"] for c in controls)}
        reserved = {"tokenize", "add_generation_prompt", "continue_final_message", "tools", "messages", "conversation",
                    "return_dict", "chat_template"} & set(template_kwargs or {})
        if reserved:
            raise RequestError(f"chat_template_kwargs may not set {', '.join(sorted(reserved))}",
                               param="chat_template_kwargs")
        kw = dict(template_kwargs or {}, add_generation_prompt=add_generation_prompt,
                  continue_final_message=continue_final_message, tools=tools)
        try:
            if not forged:
                out = self.hf.apply_chat_template(messages, tokenize=True, **kw)
                return list(out["input_ids"] if isinstance(out, Mapping) else out)
            # the template rendered around placeholders; each placeholder's content encoded as plain text
            marks = {i: f"PDSERVECONTENT{i}X" for i in forged}
            shown = [dict(m, content=marks[i]) if i in marks else m for i, m in enumerate(messages)]
            text = self.hf.apply_chat_template(shown, tokenize=False, **kw)
        except Exception as e:  # template errors are the caller's input problem
            raise RequestError(f"chat template failed on these messages: {e}", param="messages") from e
        ids: list[int] = []
        for i, mark in sorted(marks.items()):
            before, found, text = text.partition(mark)
            ids += self.hf.encode(before, add_special_tokens=False)
            if found:
                ids += self.hf(messages[i]["content"], add_special_tokens=False, split_special_tokens=True)["input_ids"]
        return ids + self.hf.encode(text, add_special_tokens=False)

    def _control_tokens(self) -> list[str]:
        """The tokenizer's special tokens as text (what a chat template's turns are made of)."""
        if not hasattr(self, "_controls"):
            added = getattr(self.hf, "added_tokens_decoder", {}) or {}
            self._controls = sorted({t.content for t in added.values() if getattr(t, "special", False)}
                                    | set(self.hf.all_special_tokens))
        return self._controls

    def bad_words_ids(self, words: list[str]) -> tuple[tuple[int, ...], ...]:
        """Each word's token sequences to forbid: as it starts a text and, when that tokenizes
        differently, after a space (how vLLM reads bad_words)."""
        out: list[tuple[int, ...]] = []
        for word in words:
            plain = tuple(self.hf.encode(word.lstrip(), add_special_tokens=False))
            if not plain:
                raise RequestError("bad_words entries must be text that makes at least one token", param="bad_words")
            out.append(plain)
            spaced = tuple(self.hf.encode(" " + word.lstrip(), add_special_tokens=False))
            if spaced and spaced[0] != plain[0] and len(spaced) == len(plain):
                out.append(spaced)
        return tuple(out)

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.hf.decode([token_id])


TRIM_AFTER_CHARS = 1 << 20  # tokenising this much text leaves ~0.3 GB in malloc's free lists


def _trim_heap() -> None:
    """Hands the tokenizer's freed scratch memory back to the OS (glibc keeps it otherwise:
    the process would stay as large as its largest prompt made it)."""
    if _libc is not None:
        _libc.malloc_trim(0)


_libc = None
try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    _libc.malloc_trim  # glibc only
except (OSError, AttributeError):
    _libc = None


def _unicode(text: str, param: str) -> str:
    """text, refused when it cannot be encoded (a lone surrogate such as "\\ud800")."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{param} is not valid Unicode text: {e.reason} at position {e.start}", param=param) from None
    return text


# tokenizer classes that are transformers' generic fast tokenizer: loaded as it, without the
# model registry behind AutoTokenizer (which imports torch); any other class goes through it
_GENERIC = {"TokenizersBackend", "PreTrainedTokenizerFast"}


def _from_folder(folder: Path):
    config = folder / "tokenizer_config.json"
    tokenizer_class = json.loads(config.read_text()).get("tokenizer_class") if config.exists() else None
    if tokenizer_class in _GENERIC and (folder / "tokenizer.json").exists():
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
        return TokenizersBackend.from_pretrained(folder)
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(folder)


class TextStream:
    """Text of one output sequence, built token by token."""

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_token_ids: list[int], stop: tuple[str, ...] = (),
                 skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.stop = stop
        self.holdback = max((len(s) for s in stop), default=1) - 1
        context = prompt_token_ids[-self.CONTEXT_TOKENS:]
        self.tokens = list(context)
        self.prefix_offset = 0
        self.read_offset = len(context)
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def add(self, token_ids: list[int]) -> None:
        """Appends tokens; sets `stopped` (and cuts the text) when a stop string appears."""
        for token_id in token_ids:
            if self.stopped:
                return
            self.tokens.append(token_id)
            prefix = self.tokenizer.decode(self.tokens[self.prefix_offset:self.read_offset], self.skip)
            full = self.tokenizer.decode(self.tokens[self.prefix_offset:], self.skip)
            if len(full) <= len(prefix) or full.endswith("\ufffd"):
                continue
            start = max(0, len(self.text) - self.holdback)
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            self._check_stop(start)

    def _check_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def delta(self, final: bool) -> str:
        """Text not yet handed out; before the end, keeps back what a stop string may still claim."""
        end = len(self.text) if final or self.stopped else max(self.emitted, len(self.text) - self.holdback)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out
