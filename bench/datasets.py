"""Workloads: the requests of a benchmark, as (prompt text, max_tokens) with their lengths.

- `random`: input and output lengths uniform in [L(1-r), L(1+r)] (vLLM's `--random-range-ratio`).
- `chatbot`, `code`, `summarization`: lengths drawn from log-normal distributions shaped
  like the public traces DistServe evaluates on (ShareGPT, HumanEval, LongBench). The
  means and their sources are in `WORKLOADS`; `--input-len` / `--output-len` move the
  means and keep the spread, for hardware that cannot serve the published sizes.
- `shift`: prompts that shift from short to long halfway: the first half of the requests ask
  for about a quarter of `--input-len`, the second half for 1.75 times it (uniform +-25 %);
  outputs as `random` (`--output-len`, `--range-ratio`). For comparing routing policies when the
  workload changes under them.
- `file`: JSONL lines `{"prompt": ..., "max_tokens": ...}` (`output_len` also accepted),
  or ShareGPT-format JSON (first human turn is the prompt, the reply's length the output).
  JSONL rows that all carry `"at_s"` (seconds from the phase's start) are a trace: replayed
  once, in order, each at its time, whatever `--num-prompts` and the rate say.

Prompt text is real text from `bench.corpus`; every request is clipped so that prompt
plus output fits the server's context.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

from bench.corpus import Kind, TextSource, TokenCounter


@dataclass(frozen=True)
class BenchRequest:
    prompt: str
    max_tokens: int
    prompt_tokens: int  # counted with the tokenizer when given, else estimated
    at_s: float | None = None  # a trace's send time (seconds from the phase's start)


@dataclass(frozen=True)
class LogNormal:
    """Token lengths with a given mean and coefficient of variation, clipped to [low, high]."""

    mean: float
    cv: float
    low: int
    high: int

    def sample(self, rng: random.Random, mean: float | None = None) -> int:
        mean = mean or self.mean
        sigma = math.sqrt(math.log(1 + self.cv ** 2))
        mu = math.log(mean) - sigma ** 2 / 2  # so that E[X] = mean before clipping
        return int(min(self.high, max(self.low, round(rng.lognormvariate(mu, sigma)))))


@dataclass(frozen=True)
class Workload:
    kind: Kind
    input: LogNormal
    output: LogNormal
    source: str
    framing: str = ""  # put before the text, e.g. the summarization instruction


# Means are the published ones; the spreads (CV) are our assumption, chosen to give the
# long right tails the papers' histograms show. Output lengths are what the model is asked
# to generate (max_tokens with ignore_eos), so servers are compared on equal work.
WORKLOADS: dict[str, Workload] = {
    "chatbot": Workload(
        "prose", LogNormal(161, 1.2, 4, 4096), LogNormal(338, 1.0, 4, 2048),
        source="ShareGPT as measured in the vLLM paper (Kwon et al., SOSP'23, sec. 6.1): mean prompt "
               "161 tokens, mean output 338 tokens, both long-tailed; DistServe's chatbot workload"),
    "code": Workload(
        "code", LogNormal(130, 0.5, 16, 1024), LogNormal(60, 0.6, 4, 512),
        source="HumanEval (Chen et al., 2021): 164 prompts of a signature and docstring, about 450 "
               "characters (~130 tokens), canonical solutions about 180 characters (~60 tokens); our "
               "estimate from the dataset's form, not a published table; DistServe's code-completion workload"),
    "summarization": Workload(
        "prose", LogNormal(8700, 0.6, 512, 32768), LogNormal(300, 0.5, 16, 512),
        framing="Summarize the following text.\n\n",
        source="LongBench (Bai et al., ACL'24): English inputs average 6,711 words (~8,700 tokens at 1.3 "
               "tokens a word); summaries capped at 512 tokens as in LongBench's own generation limits; "
               "DistServe's summarization workload"),
}


@dataclass(frozen=True)
class DatasetSpec:
    name: str  # random | chatbot | code | summarization | file
    num_prompts: int
    input_len: int | None = None
    output_len: int | None = None
    range_ratio: float = 0.0
    path: str | None = None
    seed: int = 0


def build_requests(spec: DatasetSpec, counter: TokenCounter, max_model_len: int | None) -> list[BenchRequest]:
    rng = random.Random(spec.seed)
    if spec.name == "file":
        if not spec.path:
            raise ValueError("--dataset file needs a path (--dataset-path PATH)")
        return _from_file(Path(spec.path), spec, counter, rng, max_model_len)
    if spec.name == "random":
        if spec.input_len is None or spec.output_len is None:
            raise ValueError("--dataset random needs --input-len and --output-len")
        if not 0 <= spec.range_ratio < 1:
            raise ValueError("--range-ratio must be in [0, 1)")
        lengths = [(_uniform(rng, spec.input_len, spec.range_ratio), _uniform(rng, spec.output_len, spec.range_ratio))
                   for _ in range(spec.num_prompts)]
        kind, framing = "prose", ""
    elif spec.name == "shift":
        if spec.input_len is None or spec.output_len is None:
            raise ValueError("--dataset shift needs --input-len and --output-len")
        short, long = max(1, spec.input_len // 4), spec.input_len * 7 // 4
        lengths = [(_uniform(rng, short if i < spec.num_prompts // 2 else long, 0.25),
                    _uniform(rng, spec.output_len, spec.range_ratio)) for i in range(spec.num_prompts)]
        kind, framing = "prose", ""
    elif spec.name in WORKLOADS:
        w = WORKLOADS[spec.name]
        lengths = [(w.input.sample(rng, spec.input_len), w.output.sample(rng, spec.output_len))
                   for _ in range(spec.num_prompts)]
        kind, framing = w.kind, w.framing
    else:
        raise ValueError(f"unknown dataset {spec.name!r}: random, shift, {', '.join(WORKLOADS)} or file")
    source = TextSource(kind, counter)
    out = []
    for input_len, output_len in lengths:
        input_len, output_len = _fit(input_len, output_len, max_model_len)
        framing_len = counter.count(framing) if framing else 0
        text, n = source.window(max(1, input_len - framing_len), rng)
        out.append(BenchRequest(framing + text, output_len, n + framing_len))
    return out


def _uniform(rng: random.Random, length: int, ratio: float) -> int:
    return max(1, rng.randint(math.floor(length * (1 - ratio)), math.ceil(length * (1 + ratio))))


def _fit(input_len: int, output_len: int, max_model_len: int | None) -> tuple[int, int]:
    """Clip so the request fits the server's context (a little slack for template tokens)."""
    if max_model_len is None:
        return input_len, output_len
    output_len = min(output_len, max_model_len // 2)
    return min(input_len, max_model_len - output_len - 16), output_len


def _from_file(path: Path, spec: DatasetSpec, counter: TokenCounter, rng: random.Random,
               max_model_len: int | None) -> list[BenchRequest]:
    text = path.read_text()
    pairs: list[tuple[str, int]] = []
    times: list[float | None] = []
    if path.suffix == ".jsonl" or not text.lstrip().startswith("["):
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if "prompt" not in row:
                raise ValueError(f"{path}:{line_no}: a JSONL row needs a 'prompt'")
            pairs.append((row["prompt"], int(row.get("max_tokens") or row.get("output_len") or 128)))
            times.append(float(row["at_s"]) if "at_s" in row else None)
    else:  # ShareGPT: [{"conversations": [{"from": "human", "value": ...}, {"from": "gpt", ...}]}]
        for entry in json.loads(text):
            turns = entry.get("conversations") or []
            if len(turns) >= 2 and turns[0].get("value") and turns[1].get("value"):
                pairs.append((turns[0]["value"], counter.count(turns[1]["value"])))
    if not pairs:
        raise ValueError(f"{path} holds no usable prompts")
    trace = bool(times) and all(t is not None for t in times)
    if any(t is not None for t in times) and not trace:
        raise ValueError(f"{path}: give 'at_s' on every row (a trace, replayed in order) or on none")
    if not trace:
        rng.shuffle(pairs)
        times = [None] * spec.num_prompts
        pairs = [pairs[i % len(pairs)] for i in range(spec.num_prompts)]  # repeats when the file is shorter
    out = []
    for (prompt, max_tokens), at_s in zip(pairs, times):
        n = counter.count(prompt)
        if max_model_len is not None and n + max_tokens > max_model_len:
            max_tokens = max_model_len - n
            if max_tokens < 1:
                continue  # too long for this server: skipped, as vLLM's benchmark does
        out.append(BenchRequest(prompt, max(1, max_tokens), n, at_s))
    return out
