"""Measures one engine's prefill and decode throughput; prints one JSON line.

Runs inside the measured system's own Python (vLLM lives in its own virtualenv), so it
imports nothing from pdserve at module level. Every system is timed the same way:
  decode tok/s  = B * N / (t(B prompts, 1 + N tokens) - t(B prompts, 1 token))
  prefill tok/s = B * L / t(B prompts of L tokens, 1 token)
with random token-id prompts, greedy sampling and EOS ignored, best of --repeats.
"""

from __future__ import annotations

import argparse
import json
import random
import time


def prompts(batch: int, length: int, seed: int, vocab: int = 49152) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(batch)]


def make_pdserve(args):
    from engine.config import EngineConfig
    from engine.engine import Engine
    from engine.sampling_params import SamplingParams
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, num_threads=args.threads,
                                 max_model_len=2048, max_num_seqs=64, max_num_batched_tokens=4096,
                                 enable_prefix_caching=False))
    counter = iter(range(10**9))

    def generate(batch, n_tokens):
        params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        for p in batch:
            engine.add_request(str(next(counter)), p, params)
        while engine.has_unfinished():
            engine.step()
    return generate


def make_hf(args):
    import torch
    import transformers
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).eval()

    def generate(batch, n_tokens):
        ids = torch.tensor(batch)
        with torch.inference_mode():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_tokens,
                           min_new_tokens=n_tokens, do_sample=False)
    return generate


def make_vllm(args):
    """vLLM as it runs best on CPU: its engine core in a process of its own (where vLLM sets up
    OpenMP: libgomp, threads pinned to VLLM_CPU_OMP_THREADS_BIND) and the model compiled,
    unless --eager."""
    from vllm import LLM, SamplingParams, TokensPrompt
    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, enforce_eager=args.eager,
              enable_prefix_caching=False, max_num_seqs=64, max_num_batched_tokens=4096)

    def generate(batch, n_tokens):
        params = SamplingParams(temperature=0, max_tokens=n_tokens, ignore_eos=True)
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in batch], params, use_tqdm=False)
    return generate


def timed(generate, batch, n_tokens, repeats) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        generate(batch, n_tokens)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--system", choices=["pdserve", "hf", "vllm"], required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--prefill-batch", type=int, default=8)
    ap.add_argument("--prefill-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--eager", action="store_true", help="vLLM: no torch.compile (a quick run)")
    args = ap.parse_args()
    generate = {"pdserve": make_pdserve, "hf": make_hf, "vllm": make_vllm}[args.system](args)
    generate(prompts(2, 16, 0), 4)  # warm-up
    result = {"system": args.system, "dtype": args.dtype, "threads": args.threads, "decode_tok_s": {}}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        batch = prompts(b, args.prompt_len, b)
        t1 = timed(generate, batch, 1, args.repeats)
        tn = timed(generate, batch, 1 + args.output_len, args.repeats)
        result["decode_tok_s"][str(b)] = b * args.output_len / (tn - t1)
    batch = prompts(args.prefill_batch, args.prefill_len, 99)
    result["prefill_tok_s"] = args.prefill_batch * args.prefill_len / timed(generate, batch, 1, args.repeats)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
