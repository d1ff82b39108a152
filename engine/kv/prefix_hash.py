"""The names of prefix-cache blocks, shared by the engine's KV manager and the router.

A full block of tokens is named by the hash of (its parent block's name, its token ids),
the first block's parent being 0: equal names mean equal prefixes. Int tuples hash alike in
every process (no hash randomisation for ints), so a router can predict which blocks a
worker holds.
"""

from __future__ import annotations


def extend_block_hashes(hashes: list[int], token_ids: list[int], block_size: int, num_full_blocks: int) -> list[int]:
    """Appends to hashes (the names of the first len(hashes) blocks of token_ids) until it
    names num_full_blocks blocks; returns it."""
    while len(hashes) < num_full_blocks:
        i = len(hashes)
        hashes.append(hash((hashes[-1] if hashes else 0, tuple(token_ids[i * block_size:(i + 1) * block_size]))))
    return hashes


def prompt_block_hashes(token_ids: list[int], block_size: int) -> list[int]:
    """Names of the prompt's full blocks but the last token's (a prefill always computes the
    last token, so its block is never taken from the cache)."""
    return extend_block_hashes([], token_ids, block_size, (len(token_ids) - 1) // block_size)
