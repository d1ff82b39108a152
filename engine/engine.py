"""One engine on one device: requests in, one batched step at a time, token deltas out.

Not thread-safe: one caller drives add_request / abort / step (the worker loop, or the
offline LLM). A request with n > 1 runs as n child requests sharing the prompt's cached
blocks; outputs carry (request_id, index).
"""

from __future__ import annotations

import time

from engine.batcher import Batcher, StepPlan
from engine.config import EngineConfig
from engine.errors import EngineError, RequestError
from engine.kv.exporter import LayerExporter
from engine.kv.lent import LentBlocks
from engine.kv.manager import KVCacheManager
from engine.kvpred.prefill import PredictedPrefill
from engine.models.registry import resolve_model_path
from engine.outputs import EngineInfo, EngineStats, StepOutput, TokenLogprobs
from engine.parallel.kv_link import EXPECT, FORGET, LINK, UNLINK, KVLink
from engine.request import Request, RequestStatus, validate_request
from engine.runner import ModelRunner
from engine.sampling_params import SamplingParams
from engine.transfer.base import KVSink, LayerChunk

PREFILL_SAMPLE_TOKENS = 32  # a step with fewer prompt tokens says little of prefill speed


class Engine:
    """Our engine: the first implementation of engine.interface.WorkerEngine."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None,
                 kv: KVCacheManager | LentBlocks | None = None):
        """runner and kv: semi-PD's prefill engine shares the decode engine's weights and KV
        cache (a sibling runner) and computes into blocks the decode side lends it."""
        self.config = config
        self.model_path = resolve_model_path(config.model)
        self.runner = runner or ModelRunner(config, self.model_path)
        info = self.runner.info
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.num_kv_blocks = info.num_kv_blocks
        if info.num_kv_blocks * config.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {info.num_kv_blocks * config.block_size} tokens, fewer "
                             f"than max_model_len={self.max_model_len}: raise --kv-cache-memory or "
                             f"--num-kv-blocks, or lower --max-model-len")
        self.kv = kv or KVCacheManager(info.num_kv_blocks, config.block_size, config.enable_prefix_caching)
        self.batcher = Batcher(self.kv, config.max_num_seqs, config.max_num_batched_tokens, config.prefill_schedule,
                               config.token_budget, self.model_config.num_layers)
        self.requests: dict[str, list[Request]] = {}
        self.exporter: LayerExporter | None = None  # set on a prefill engine: ships prompt KV
        self.kv_predictor: PredictedPrefill | None = None
        if config.kv_predictor:
            r = self.runner
            self.kv_predictor = PredictedPrefill(config.kv_predictor, r.model, self.max_model_len, r.device, r.dtype)
        self.num_predicted_prefills = 0
        cache = self.runner.kv_cache.tensor
        self.info = EngineInfo(self.max_model_len, self.model_config.vocab_size, config.block_size, self.num_kv_blocks,
                               (config.block_size, self.model_config.num_kv_heads, self.model_config.head_dim),
                               str(cache.dtype).removeprefix("torch."), str(self.runner.device),
                               self.kv_predictor is not None, config.tensor_parallel_size)
        self.prefill_s_per_token = 0.0  # moving average over steps with at least PREFILL_SAMPLE_TOKENS prompt tokens
        self._ready: list[StepOutput] = []  # first tokens of admitted prefilled requests

    def set_kv_sink(self, sink: KVSink) -> None:
        """Makes this a prefill engine: every prompt's KV goes to sink, layer by layer."""
        self.exporter = LayerExporter(self.runner.kv_cache, sink, self.model_config.num_layers)

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prefills: bool = True) -> None:
        """Raises RequestError for a request this engine cannot run (prefills: it would
        compute the prompt itself, not receive its KV)."""
        validate_request(prompt_token_ids, params, self.max_model_len, self.model_config.vocab_size)
        if params.kv_prediction and prefills and self.kv_predictor is None:
            raise RequestError("kv_prediction: this server has no KV predictor (start it with --kv-predictor DIR)",
                               param="kv_prediction")
        if params.kv_prediction and params.n != 1:
            raise RequestError("kv_prediction works with n=1 only", param="n")
        if params.structured is not None:
            self.runner.sampler.grammars.compile(params.structured)

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None, validated: bool = False) -> None:
        """validated: the caller has run `validate` on this request already."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if not validated:
            self.validate(prompt_token_ids, params)
        children = []
        for i in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{i}"
            children.append(Request(child_id, prompt_token_ids, params.for_child(i) if params.n > 1 else params,
                                    self.model_config.eos_token_ids, self.max_model_len, index=i,
                                    parent_id=request_id, arrival_s=arrival_s))
        self.requests[request_id] = children
        if params.kv_prediction and self._predict(children[0]):
            return
        for child in children:
            self.batcher.add(child)

    def _predict(self, request: Request) -> bool:
        """Predicted prefill (engine/kvpred/prefill.py): the prompt's cached prefix blocks are
        used as they are; the predictor's KV of the rest but the last token lands in new blocks
        through the KV import path. The request then runs with that much computed, so its next
        step computes the last token and samples. False, changing nothing, when there is nothing
        to predict (a one-token or wholly cached prompt) or no room in the pool now: the request
        is then prefilled as usual."""
        n = request.num_prompt_tokens - 1
        cached = self.kv.get_computed_blocks(request)
        num_cached = len(cached) * self.config.block_size
        if num_cached >= n or not self.kv.allocate_slots(request, n - num_cached, cached):
            request.kv_predicted = False
            return False
        request.num_cached_tokens = num_cached
        request.status = RequestStatus.WAITING_FOR_KV
        request.timeline.first_scheduled_s = request.timeline.prefill_start_s = time.monotonic()
        for chunk in self.kv_predictor.chunks(request.request_id, request.prompt_token_ids, self.config.block_size,
                                              len(cached)):
            self.receive_kv(chunk)
        request.num_computed_tokens = n
        self.batcher.add_running(request)
        self.num_predicted_prefills += 1
        return True

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Ends the request (or only its index-th sample) in any state and frees its blocks."""
        children = self.requests.get(request_id)
        if children is None:
            return False
        for child in children:
            if (index is None or child.index == index) and not child.status.finished:
                self._finish(child, RequestStatus.FINISHED_ABORTED)  # the last one drops the request
        return True

    # decode side of disaggregation: reserve, receive the prompt's KV, then decode

    def reserve_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          arrival_s: float | None = None, transfer_id: int = 0) -> int | None:
        """Reserves blocks for a prompt (validated, n=1) that a prefill engine will compute into
        them. Returns the leading blocks cached here already, or None, changing nothing, when
        the pool has no room. transfer_id: what its KV travels under (the other ranks of a
        tensor-parallel engine receive their heads by it)."""
        if request_id in self.requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if params.n != 1:
            raise RequestError("disaggregated serving supports n=1 only", param="n")
        request = Request(request_id, prompt_token_ids, params, self.model_config.eos_token_ids,
                          self.max_model_len, arrival_s=arrival_s)
        if self.runner.ranks_down or not self.kv.reserve(request, request.num_prompt_tokens):
            return None  # (the next step starts a tensor-parallel group that lost a rank again)
        request.status = RequestStatus.WAITING_FOR_KV
        request.timeline.reserved_s = time.monotonic()
        self.requests[request_id] = [request]
        if transfer_id:
            request.transfer_id = transfer_id
            self.runner.tell_ranks(EXPECT, [transfer_id, *request.block_ids])
        return request.num_cached_tokens // self.config.block_size

    def open_kv_link(self, link: KVLink) -> None:
        """The other ranks of a tensor-parallel engine join a KV link this rank is joining."""
        self.runner.tell_ranks(LINK, link.encode())

    def close_kv_link(self, link_no: int) -> None:
        self.runner.tell_ranks(UNLINK, [link_no])

    def allocated(self) -> list[tuple[str, int]]:
        return []  # reserve_prefilled allocates at once

    def waiting_for_kv(self, request_id: str) -> bool:
        return self._waiting_for_kv(request_id) is not None

    def lend_blocks(self, request_id: str) -> list[int]:
        """Semi-PD: one more reference on a reserved request's blocks, for the prefill stream
        to compute into (given back through the pool's `release`)."""
        request = self.requests[request_id][0]
        blocks = list(request.block_ids)
        self.kv.pool.take(blocks)
        return blocks

    def receive_kv(self, chunk: LayerChunk) -> bool:
        """Writes one layer chunk into the request's reserved blocks (False: no such request,
        e.g. aborted meanwhile; the chunk is dropped)."""
        request = self._waiting_for_kv(chunk.request_id)
        if request is None:
            return False
        blocks = request.block_ids[chunk.first_block:chunk.first_block + chunk.num_blocks]
        assert len(blocks) == chunk.num_blocks, "chunk beyond the reserved blocks"
        if chunk.num_blocks:
            self.runner.kv_cache.import_blocks(chunk.layer, blocks, chunk.packed, chunk.heads)
        t = request.timeline
        t.kv_last_s = time.monotonic()
        t.kv_first_s = t.kv_first_s or t.kv_last_s
        t.kv_bytes += chunk.packed.nbytes
        if chunk.last:
            request.kv_landed = True
            self._admit_when_ready(request)
        return True

    def kv_written(self, request_id: str) -> bool:
        """Semi-PD: the prefill stream has computed the whole prompt into the reserved blocks
        themselves (no copy). False: no such request waiting for its KV."""
        request = self._waiting_for_kv(request_id)
        if request is None:
            return False
        if request.transfer_id:
            self.runner.tell_ranks(FORGET, [request.transfer_id])  # nothing travels: the other ranks expect nothing
        request.kv_landed = True
        self._admit_when_ready(request)
        return True

    def give_first_token(self, request_id: str, token_id: int, logprob: TokenLogprobs | None = None,
                         prefill_s: float = 0.0) -> bool:
        """The prefill side's first token, which took it prefill_s of compute. The request joins
        the decodes once its KV has landed too, whichever comes last; its first output comes out
        of the next step."""
        request = self._waiting_for_kv(request_id)
        if request is None:
            return False
        request.first_token = (token_id, logprob)
        t = request.timeline
        t.prefill_end_s = time.monotonic()
        t.first_scheduled_s = t.prefill_start_s = max(t.reserved_s or t.arrival_s, t.prefill_end_s - prefill_s)
        self._admit_when_ready(request)
        return True

    def _admit_when_ready(self, request: Request) -> None:
        if request.kv_landed and request.first_token is not None:
            self._ready.append(self.admit_prefilled(request.request_id, *request.first_token))

    def admit_prefilled(self, request_id: str, first_token_id: int,
                        first_logprob: TokenLogprobs | None = None) -> StepOutput | None:
        """All layers have landed: the request joins the decodes with its first token."""
        request = self._waiting_for_kv(request_id)
        if request is None:
            return None
        now = time.monotonic()
        t = request.timeline
        t.first_scheduled_s = t.first_scheduled_s or now
        t.prefill_end_s = t.transfer_start_s = t.prefill_end_s or now
        t.transfer_end_s = max(t.kv_last_s or now, t.prefill_end_s)
        t.decode_queued_s = t.decode_start_s = t.first_token_s = now
        request.num_computed_tokens = request.num_prompt_tokens
        if first_logprob is not None:
            request.logprobs.append(first_logprob)
        status = request.append_token(first_token_id)
        if status is not None:
            self._finish(request, status)
        else:
            self.batcher.add_running(request)
        return StepOutput(request_id, 0, [first_token_id], [first_logprob] if first_logprob else [],
                          status.value if status else None, request.num_prompt_tokens, 0, t)

    def _waiting_for_kv(self, request_id: str) -> Request | None:
        children = self.requests.get(request_id)
        if not children or children[0].status is not RequestStatus.WAITING_FOR_KV:
            return None
        return children[0]

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def num_requests(self) -> int:
        return len(self.requests)

    def has_work(self) -> bool:
        """Whether a step would do anything (a request waiting for its KV gives none)."""
        return self.batcher.num_unfinished > 0 or bool(self._ready) or self.runner.ranks_down

    def step(self) -> list[StepOutput]:
        if self.runner.ranks_down:  # a tensor-parallel rank died, and the KV every request held there with it
            if self.runner.restart_ranks():
                self.kv.pool.reset_prefix_cache()
            if self.requests:
                raise EngineError("a tensor-parallel rank died; the group has started again")
        if self._ready:  # first tokens of admitted prefilled requests go out before the next forward
            outputs, self._ready = self._ready, []
            return outputs
        outputs: list[StepOutput] = []
        plan = self.batcher.schedule()
        if not plan.seqs and plan.cohort is None:
            return outputs
        sampling = [s.request for s in plan.sampling]
        now = time.monotonic()
        for seq in plan.scheduled:
            if seq.request.timeline.prefill_start_s is None:
                seq.request.timeline.prefill_start_s = now
        exporter = self.exporter
        if exporter is not None:
            exporter.plan(plan)
        runs = exporter.rank_runs() if exporter is not None and self.runner.ranks is not None else []
        result = self.runner.execute(plan, exporter.layer_done if exporter and exporter.runs else None, runs)
        self._measure_prefill(plan, time.monotonic() - now)
        for seq in plan.done:
            seq.request.num_computed_tokens += seq.num_new_tokens
        if exporter is not None:
            exporter.finish(plan)
        if result is None:
            return outputs
        now = time.monotonic()
        for row, (request, token, logprob) in enumerate(zip(sampling, result.token_ids, result.logprobs)):
            if row in result.errors:
                self._finish(request, RequestStatus.FINISHED_ABORTED)
                outputs.append(StepOutput(request.parent_id, request.index, [], finish_reason="error",
                                          error=result.errors[row], error_status=400 if row in result.refused else 500))
                continue
            status = request.append_token(token)
            if status is None and row in result.completed:
                status = RequestStatus.FINISHED_STOPPED
            timeline = request.timeline
            if timeline.first_token_s is None:
                timeline.first_token_s = timeline.prefill_end_s = timeline.decode_start_s = now
            if logprob is not None:
                request.logprobs.append(logprob)
            if status is not None:
                self._finish(request, status)
            out = StepOutput(request.parent_id, request.index, [token], [logprob] if logprob is not None else [],
                             status.value if status else None, request.num_prompt_tokens, request.num_cached_tokens,
                             timeline)
            if request.params.prompt_logprobs is not None and request.num_output_tokens == 1:
                out.prompt_logprobs = request.prompt_logprobs
            outputs.append(out)
        return outputs

    def _measure_prefill(self, plan: StepPlan, seconds: float) -> None:
        """Seconds per token of a step that prefills (its decodes counted as tokens too): what
        routing estimates a prompt's prefill time by (the KV-prediction policy)."""
        prompt = sum(s.num_new_tokens for s in plan.scheduled if s.start < s.request.num_prompt_tokens)
        if prompt >= PREFILL_SAMPLE_TOKENS:
            sample = seconds / plan.num_tokens
            old = self.prefill_s_per_token
            self.prefill_s_per_token = sample if old == 0 else 0.8 * old + 0.2 * sample

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.status is RequestStatus.WAITING_FOR_KV and request.transfer_id:
            self.runner.tell_ranks(FORGET, [request.transfer_id])  # before its blocks go to another request
        self.batcher.finish(request, status)
        self.runner.sampler.release(request.request_id)
        siblings = self.requests.get(request.parent_id, [])
        if all(c.status.finished for c in siblings):
            self.requests.pop(request.parent_id, None)

    def close(self) -> None:
        """Stops the processes this engine started (a tensor-parallel group's other ranks)."""
        self.runner.close()

    def stats(self) -> EngineStats:
        reads = self.runner.weight_reads
        return EngineStats(len(self.batcher.running), len(self.batcher.waiting), self.kv.num_used_blocks,
                           self.num_kv_blocks, self.kv.stats.queries_tokens, self.kv.stats.hit_tokens,
                           self.batcher.num_pending_prefill_tokens, reads.dense_bytes, reads.expert_bytes,
                           self.prefill_s_per_token, self.kv_predictor.cost if self.kv_predictor else 0.0,
                           self.num_predicted_prefills, self.runner.ranks.num_restarts if self.runner.ranks else 0)
