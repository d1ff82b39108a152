"""Training a KV predictor with the base model frozen (TECHNIQUES.md, KV prediction).

Each step takes one window of `seq_len` tokens from the corpus: its first `prompt_len`
tokens are the prompt (the auxiliary model reads all but the last), the rest the text that
follows. The loss is the sum of
- the base model's cross-entropy over the text that follows (from the prompt's last token
  on), computed over the predicted cache: the only thing the base sees of the prompt;
- the auxiliary model's own cross-entropy over the prompt;
- the L1 distance between predicted and true keys (before rotary) and values, per base layer.
Only the auxiliary model and the maps learn (AdamW). The trainer saves the predictor and its
own state (optimizer, step, sampling generator) every `checkpoint_every` steps and at the
end, and resumes from them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.kvpred.dense import forward_dense, rotate
from engine.kvpred.predictor import KVPredictor
from engine.models.llama import LlamaModel

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".jsonl")


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    seq_len: int = 256
    prompt_frac: float = 0.75  # of each window: the prompt; the rest is the text that follows
    lr: float = 1e-4
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.seq_len < 8 or not 0 < self.prompt_frac < 1 or self.checkpoint_every < 1:
            raise ValueError("steps and checkpoint_every must be >= 1, seq_len >= 8, prompt_frac in (0, 1)")

    @property
    def prompt_len(self) -> int:
        return max(2, min(self.seq_len - 2, round(self.seq_len * self.prompt_frac)))


@dataclass(frozen=True)
class Losses:
    total: float
    base_ce: float
    aux_ce: float
    l1: float


def read_texts(paths: Iterable[str | Path]) -> list[str]:
    """Plain-text files (one document each) and JSONL files (a "text" field per line);
    folders are read recursively for files ending in TEXT_SUFFIXES, in name order."""
    texts: list[str] = []
    for path in map(Path, paths):
        if not path.exists():
            raise FileNotFoundError(f"no such data file or folder: {path}")
        files = sorted(p for p in path.rglob("*") if p.suffix in TEXT_SUFFIXES and p.is_file()) \
            if path.is_dir() else [path]
        for f in files:
            if f.suffix == ".jsonl":
                for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                    if line.strip():
                        row = json.loads(line)
                        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                            raise ValueError(f"{f}:{n}: a JSONL line needs a string field 'text'")
                        texts.append(row["text"])
            else:
                texts.append(f.read_text(errors="replace"))
    return [t for t in texts if t.strip()]


def token_windows(documents: Iterable[list[int]], seq_len: int) -> list[list[int]]:
    """Each document cut into whole windows of seq_len tokens (a short tail is dropped)."""
    return [doc[i:i + seq_len] for doc in documents for i in range(0, len(doc) - seq_len + 1, seq_len)]


def kvpred_loss(predictor: KVPredictor, base: LlamaModel, window: torch.Tensor, prompt_len: int
                ) -> tuple[torch.Tensor, Losses]:
    prompt, rest = window[:prompt_len - 1], window[prompt_len - 1:]  # rest starts at the prompt's last token
    predicted, aux_hidden = predictor.predict(prompt)
    aux_ce = F.cross_entropy(predictor.aux.compute_logits(aux_hidden[:-1]), prompt[1:])
    with torch.no_grad():
        _, true = forward_dense(base, prompt)
    l1 = sum(F.l1_loss(pk, tk) + F.l1_loss(pv, tv) for (pk, pv), (tk, tv) in zip(predicted, true)) / len(true)
    prefix = [(rotate(k, base), v) for k, v in predicted]
    hidden, _ = forward_dense(base, rest, start=prompt.shape[0], prefix=prefix)
    base_ce = F.cross_entropy(base.compute_logits(hidden[:-1]), rest[1:])
    total = base_ce + aux_ce + l1
    return total, Losses(*(float(x.detach()) for x in (total, base_ce, aux_ce, l1)))


class Trainer:
    def __init__(self, predictor: KVPredictor, base: LlamaModel, windows: list[list[int]], config: TrainConfig,
                 out: str | Path, start_step: int = 0):
        if not windows:
            raise ValueError(f"the data holds no window of {config.seq_len} tokens: add text or lower --seq-len")
        self.predictor, self.base, self.config, self.out = predictor, base, config, Path(out)
        self.windows = torch.tensor(windows)
        self.params = [p for p in predictor.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = start_step
        self.history: list[dict] = []
        state = self.out / "trainer.pt"
        if start_step and state.exists():
            saved = torch.load(state, weights_only=False)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.generator.set_state(saved["generator"])
            self.history = saved["history"]

    def run(self, on_step=None) -> list[dict]:
        """Trains up to config.steps; on_step(step, losses) after each (a progress bar)."""
        self.predictor.train()
        while self.step < self.config.steps:
            index = int(torch.randint(len(self.windows), (1,), generator=self.generator))
            loss, losses = kvpred_loss(self.predictor, self.base, self.windows[index], self.config.prompt_len)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
            self.step += 1
            self.history.append({"step": self.step, **asdict(losses)})
            if on_step is not None:
                on_step(self.step, losses)
            if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                self.save()
        return self.history

    def save(self) -> None:
        """The predictor (step in kvpred.json) and the trainer's state, each replaced whole."""
        self.predictor.save(self.out, {"step": self.step, "train": asdict(self.config)})
        tmp = self.out / "trainer.pt.tmp"
        torch.save({"optimizer": self.optimizer.state_dict(), "generator": self.generator.get_state(),
                    "history": self.history}, tmp)
        tmp.replace(self.out / "trainer.pt")
