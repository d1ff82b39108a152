"""Tensor parallelism: one model over several processes (ranks), Megatron-style."""
