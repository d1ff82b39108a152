"""Model runner: turns a StepPlan into flat tensors, runs the forward, samples.

Owns the model weights, the KV cache tensor, the attention backend and the sampler for
one device. Everything per step is built once here and passed down in a ForwardContext.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.attention import BatchLayout, select_backend
from engine.attention.base import slots_for
from engine.batcher import ScheduledSeq, StepPlan
from engine.config import EngineConfig, Switch
from engine.grammar import Grammars
from engine.kv.cache import KVCache
from engine.memory import AUTO_KV_MAX_BYTES, PACK_COPY_FACTOR, auto_budget, process_rss
from engine.models import packed_gemm
from engine.models.config import ModelConfig
from engine.models.llama import ForwardContext
from engine.models.loader import load_model, open_weights
from engine.models.moe import WeightReads
from engine.outputs import TokenLogprobs
from engine.parallel import shard as tp_shard
from engine.parallel.group import GroupError, TPGroup
from engine.sampler import Sampler, SampleResult
from engine.split import ComputeSplit

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_DEFAULT_LEN = 8192


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on a GPU, and on a CPU with bfloat16 dot-product instructions (AVX-512 BF16
    or AMX) where oneDNN runs packed bfloat16 matmuls; float32 on other CPUs, where bfloat16 is
    converted in software and runs slower than float32 (docs/results.md)."""
    if name != "auto":
        return _DTYPES[name]
    if device.type != "cpu":
        return torch.bfloat16
    native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return torch.bfloat16 if native and packed_gemm.available(device, torch.bfloat16) else torch.float32


@dataclass(frozen=True)
class RunnerInfo:
    """What the runner found at start-up, handed to the engine (never written to config)."""

    model_config: ModelConfig
    max_model_len: int
    num_kv_blocks: int


@dataclass
class MemoryPlan:
    """What the budget bought (engine/memory.py), decided while the runner is built."""

    budget: int
    min_kv: int  # KV for one max_model_len sequence
    kv_on_host: bool = True  # the budget is host memory: a GPU's KV cache is not taken from it
    packed_weights: bool = False

    def fits_packed_copy(self, packable_bytes: int) -> bool:
        """Whether the budget leaves room for a packed copy of the weights beside one sequence's KV."""
        return self.budget - process_rss() - self.min_kv >= PACK_COPY_FACTOR * packable_bytes

    def kv_bytes(self) -> int:
        """What the budget leaves now, within [one sequence, AUTO_KV_MAX_BYTES] (on a GPU:
        AUTO_KV_MAX_BYTES)."""
        if not self.kv_on_host:
            return max(self.min_kv, AUTO_KV_MAX_BYTES)
        left = self.budget - process_rss()
        if left < self.min_kv:
            log.warning("the memory budget (%d MiB) leaves %d MiB for the KV cache, less than one sequence needs: "
                        "using %d MiB (raise --memory-budget or lower --max-model-len)", self.budget >> 20,
                        max(0, left) >> 20, self.min_kv >> 20)
        return max(self.min_kv, min(AUTO_KV_MAX_BYTES, left))


PROMPT_LOGPROB_ROWS = 256  # prompt positions whose full-vocabulary logits are held at once


class ModelRunner:
    def __init__(self, config: EngineConfig, model_path: Path, tp_rank: int = 0):
        """tp_rank: with --tensor-parallel-size N, rank 0 (the engine's) starts ranks 1..N-1
        (engine/parallel/ranks.py), which build their runners with their own rank."""
        size = config.tensor_parallel_size
        self.threads = max(1, (config.num_threads or len(os.sched_getaffinity(0))) // size)
        if config.num_threads or size > 1:
            torch.set_num_threads(self.threads)
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        source = open_weights(model_path)
        model_cfg = source.config
        tp_shard.check(model_cfg, size)
        self.shard = tp_shard.Shard(model_cfg, tp_rank, size)
        max_len = config.max_model_len or min(model_cfg.max_position_embeddings, MAX_DEFAULT_LEN)
        if model_cfg.sliding_window:
            max_len = min(max_len, model_cfg.sliding_window)
        log.info("loading %s (%s, %s, max_model_len %d%s)", model_path, self.dtype, self.device, max_len,
                 f", rank {tp_rank} of {size}" if size > 1 else "")
        started = time.perf_counter()
        self.model = load_model(source, self.dtype, self.device, max_len, self.shard)
        log.info("weights loaded in %.1f s", time.perf_counter() - started)
        self.block_size = config.block_size
        kv_heads = self.shard.num_kv_heads
        per_block = KVCache.bytes_per_block(model_cfg.num_layers, config.block_size, kv_heads, model_cfg.head_dim,
                                            self.dtype)
        budget = (config.memory_budget_bytes or auto_budget()) // size  # each rank is a process of its own
        self.memory = MemoryPlan(budget, -(-max_len // config.block_size) * per_block, kv_on_host=self.device.type == "cpu")
        self._pack_weights(config.cpu_weight_packing)
        num_blocks = config.num_kv_blocks or max(1, (config.kv_cache_bytes or self.memory.kv_bytes()) // per_block)
        self.backend = select_backend(config.attention_backend, self.device, config.block_size, self.shard.num_heads,
                                      kv_heads, model_cfg.head_dim, self.dtype)
        self.kv_cache = KVCache(model_cfg.num_layers, num_blocks, config.block_size, kv_heads,
                                model_cfg.head_dim, self.dtype, self.device, self.backend.kv_layout)
        log.info("KV cache: %d blocks of %d tokens (%d MiB), %s attention", num_blocks, config.block_size,
                 num_blocks * per_block >> 20, self.backend.name)
        self.sampler = Sampler(self.device, config.seed, Grammars(model_path, model_cfg.vocab_size, model_cfg.eos_token_ids))
        self.info = RunnerInfo(model_cfg, max_len, num_blocks)
        self._cohort_hidden: dict[str, torch.Tensor] = {}  # layered prefill: per request, between steps
        self.weight_reads = WeightReads()  # since start: dense and expert weight bytes the steps read
        self.split: ComputeSplit | None = None  # semi-PD: this runner's share of the device
        self.phase = ""
        self._tp: TPGroup | None = None  # the other ranks' runners: their group
        self.ranks = None  # rank 0 of a tensor-parallel engine: the other ranks
        self.stream = 0  # semi-PD: which of the ranks' groups this runner's steps go on
        if size > 1 and tp_rank == 0:
            from engine.parallel.ranks import Ranks
            self.ranks = Ranks(config, model_path, num_blocks, self.device)

    @property
    def tp(self) -> TPGroup | None:
        """The tensor-parallel group this runner's steps and collectives go on (None: one rank)."""
        return self.ranks.groups[self.stream] if self.ranks is not None else self._tp

    @tp.setter
    def tp(self, group: TPGroup) -> None:
        self._tp = group

    def _pack_weights(self, packing: Switch) -> None:
        if packing == Switch.OFF:
            return
        if not packed_gemm.available(self.device, self.dtype):
            if packing == Switch.ON:
                raise ValueError(f"--cpu-weight-packing on: oneDNN cannot run {self.dtype} matmuls on {self.device} "
                                 "here (it packs CPU weights only, bfloat16 where the CPU has AVX-512)")
            return
        if packing == Switch.AUTO and not self.memory.fits_packed_copy(self.model.packable_bytes()):
            log.info("no packed weights: --memory-budget leaves no room for them beside one sequence's KV")
            return
        started = time.perf_counter()
        self.model.pack_weights()
        self.memory.packed_weights = True
        log.info("packed weights for oneDNN in %.1f s", time.perf_counter() - started)

    def share(self, split: ComputeSplit, phase: str) -> "ModelRunner":
        """Semi-PD: this runner runs `phase` on its share of `split`, and the returned sibling
        runs the other phase with the same weights and KV cache (its own sampler, layered
        state and counters). Each is driven by one thread. With tensor parallelism every rank
        runs the sibling's steps too, on a group of their own."""
        if self.memory.packed_weights:  # both threads run the matmuls at once
            self.model.pack_weights(threads=2)
        other = copy.copy(self)
        other.sampler = Sampler(self.device, self.sampler.seed + 1, self.sampler.grammars)
        other._cohort_hidden, other.weight_reads = {}, WeightReads()
        self.split = other.split = split
        self.phase, other.phase = phase, split.other(phase)
        if self.ranks is not None:
            other.stream = self.ranks.add_stream()
        return other

    def _layout(self, seqs: list[ScheduledSeq]) -> tuple[torch.Tensor, torch.Tensor, BatchLayout]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        seq_lens, block_ids = [], []
        for seq in seqs:
            r = seq.request
            start, end = seq.start, seq.start + seq.num_new_tokens
            input_ids.extend(r.all_token_ids[start:end])
            positions.extend(range(start, end))
            slots.extend(slots_for(r.block_ids, start, end, bs))
            query_start.append(len(input_ids))
            seq_lens.append(end)
            block_ids.append(r.block_ids)
        dev = self.device
        layout = BatchLayout(query_start, seq_lens, block_ids,
                             torch.tensor(slots, dtype=torch.long, device=dev), bs)
        return (torch.tensor(input_ids, dtype=torch.long, device=dev),
                torch.tensor(positions, dtype=torch.long, device=dev), layout)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, layer_done: Callable[[int], None] | None = None,
                runs: list[int] = ()) -> SampleResult | None:
        """Runs one step; returns tokens for the sequences that sample, in `plan.sampling` order.
        layer_done(i) is called as soon as layer i has written its KV (layer-wise transfer);
        runs: the KV the other ranks of a tensor-parallel group ship as layers finish
        (engine/parallel/kv_link.py encode_runs)."""
        with self.split.use(self.phase) if self.split else contextlib.nullcontext():
            return self._execute(plan, layer_done, runs)

    @property
    def ranks_down(self) -> bool:
        """Tensor parallel: a rank died (its process is gone, or a collective failed), so the
        group must start again."""
        return self.ranks is not None and self.ranks.down

    def tell_ranks(self, kind: int, values: list[int]) -> None:
        """A control message to the other ranks of a tensor-parallel group (engine/parallel/kv_link.py);
        none when the group is down (the ranks that start again hold nothing)."""
        if self.ranks is not None and self.stream == 0 and self.tp.broken is None:
            try:
                self.tp.send_control(kind, values)
            except GroupError:
                pass  # the next step starts the group again

    def restart_ranks(self) -> bool:
        """Starts the other ranks again (the KV they held is gone with them: the engine
        forgets its prefix cache) and says so; a semi-PD sibling waits for the runner of the
        first stream to do it, and says False."""
        if self.stream:
            self.ranks.wait_restarted()
            return False
        self.ranks.restart()
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, layout: BatchLayout,
                layer_done: Callable[[int], None] | None = None, runs: list[int] = ()) -> torch.Tensor:
        """Hidden states of a flat batch through every layer (rank 0 first hands the step to the
        other ranks of a tensor-parallel group)."""
        if self.ranks is not None:
            self.tp.send_step(input_ids, positions, layout, runs, self.split.prefill_share if self.split else 0.0)
        ctx = self._context(positions, layout)
        hidden = self.model.embed(input_ids)
        if layer_done is None:
            return self.model.run_layers(hidden, ctx)
        for i in range(self.model.num_layers):
            hidden = self.model.run_layers(hidden, ctx, i, i + 1)
            layer_done(i)
        return hidden

    def close(self) -> None:
        """Stops the other ranks of a tensor-parallel group (the first stream's runner: a semi-PD
        sibling leaves them to it)."""
        if self.ranks is not None and self.stream == 0:
            self.ranks.stop()
        self.ranks = None

    def _execute(self, plan: StepPlan, layer_done: Callable[[int], None] | None,
                 runs: list[int]) -> SampleResult | None:
        if plan.cohort is not None:
            hidden, layout = self._layered(plan, layer_done)
        else:
            input_ids, positions, layout = self._layout(plan.seqs)
            hidden = self.forward(input_ids, positions, layout, layer_done, runs)
        if any(s.request.computing_prompt_logprobs for s in plan.done):
            self._prompt_logprobs(plan, hidden, layout)
        rows = [i for i, s in enumerate(plan.done) if s.samples]
        if not rows:
            return None
        last = torch.tensor([layout.query_start[i + 1] - 1 for i in rows], device=self.device)
        logits = self.model.compute_logits(self.model.final_norm(hidden.index_select(0, last)))
        return self.sampler.sample(logits, [plan.done[i].request for i in rows])

    def _prompt_logprobs(self, plan: StepPlan, hidden: torch.Tensor, layout: BatchLayout) -> None:
        """Appends to each request that asked for them the logprobs of the prompt tokens this step's
        rows predict (row p predicts token p + 1), in slices of PROMPT_LOGPROB_ROWS."""
        for i, seq in enumerate(plan.done):
            request = seq.request
            if not request.computing_prompt_logprobs:
                continue
            start = len(request.prompt_logprobs) - 1  # the position whose row predicts the next one wanted
            end = min(seq.start + seq.num_new_tokens, request.num_prompt_tokens - 1)
            k = request.params.prompt_logprobs
            for lo in range(max(start, seq.start), end, PROMPT_LOGPROB_ROWS):
                hi = min(end, lo + PROMPT_LOGPROB_ROWS)
                base = layout.query_start[i] - seq.start
                h = hidden[base + lo:base + hi]
                lp = torch.log_softmax(self.model.compute_logits(self.model.final_norm(h)).float(), dim=-1)
                targets = torch.tensor(request.prompt_token_ids[lo + 1:hi + 1], device=lp.device)
                chosen = lp.gather(1, targets[:, None])[:, 0].tolist()
                tops = lp.topk(k, dim=-1) if k else None
                for j, (tok, val) in enumerate(zip(request.prompt_token_ids[lo + 1:hi + 1], chosen)):
                    top = list(zip(tops.indices[j].tolist(), tops.values[j].tolist())) if tops is not None else []
                    request.prompt_logprobs.append(TokenLogprobs(tok, val, top))

    def _context(self, positions: torch.Tensor, layout: BatchLayout) -> ForwardContext:
        return ForwardContext(positions, self.model.rotary.cos_sin(self.dtype), self.kv_cache, self.backend,
                              self.backend.prepare(layout, self.device), self.weight_reads,
                              self.tp.all_reduce if self.tp is not None else None)

    def _layered(self, plan: StepPlan, layer_done: Callable[[int], None] | None
                 ) -> tuple[torch.Tensor, BatchLayout]:
        """Every decode through all layers; the cohort through its group, packed with the decodes
        there so the group's weights are read once (layer_done after each of the group's layers).
        Returns the hidden states of `plan.done` (the cohort's only on its last group) and their
        layout."""
        cohort = plan.cohort
        assert cohort is not None
        ids_all, pos_all, layout_all = self._layout(plan.scheduled)
        n, num_d = len(plan.seqs), layout_all.query_start[len(plan.seqs)]
        if cohort.first:
            hidden_c = self.model.embed(ids_all[num_d:])
        else:  # requests aborted since the last group are gone from the plan; drop their rows
            hidden_c = torch.cat([self._cohort_hidden[s.request.request_id] for s in cohort.seqs])
        hidden_d = self.model.embed(ids_all[:num_d])
        if plan.seqs:
            layout_d = BatchLayout(layout_all.query_start[:n + 1], layout_all.seq_lens[:n], layout_all.block_ids[:n],
                                   layout_all.slot_mapping[:num_d], layout_all.block_size)  # the decodes lead
            ctx_d = self._context(pos_all[:num_d], layout_d)
            hidden_d = self.model.run_layers(hidden_d, ctx_d, 0, cohort.layer_start)
        hidden, ctx_all = torch.cat([hidden_d, hidden_c]), self._context(pos_all, layout_all)
        for i in range(cohort.layer_start, cohort.layer_end):
            hidden = self.model.run_layers(hidden, ctx_all, i, i + 1)
            if layer_done is not None:
                layer_done(i)
        hidden_d, hidden_c = hidden[:num_d], hidden[num_d:]
        if plan.seqs:
            hidden_d = self.model.run_layers(hidden_d, ctx_d, cohort.layer_end)
        self._cohort_hidden = {}
        if not cohort.last:
            sizes = [s.num_new_tokens for s in cohort.seqs]
            self._cohort_hidden = {s.request.request_id: h for s, h in zip(cohort.seqs, hidden_c.split(sizes))}
            return hidden_d, layout_all
        return torch.cat([hidden_d, hidden_c]), layout_all
