"""The prompts and greedy settings every parity test (colocated, 1P1D, roles) compares on."""

import torch

from engine.sampling_params import SamplingParams

NUM_TOKENS = 32
# very different lengths in one batch; 200 tokens span 13 blocks of 16
PROMPT_LENS = (1, 5, 17, 40, 64, 100, 3, 200)

# min_tokens masks EOS the way HF generate(min_new_tokens=...) does
GREEDY = SamplingParams(temperature=0, max_tokens=NUM_TOKENS, min_tokens=NUM_TOKENS)


def prompts(vocab=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in PROMPT_LENS]
