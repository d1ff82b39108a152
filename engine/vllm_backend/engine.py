"""vLLM's engine behind pdserve's worker seam (engine/interface.py): what `--engine vllm` runs.

One `LLMEngine` runs in this process, on the engine loop's thread (no engine-core process:
`VLLM_ENABLE_V1_MULTIPROCESSING=0`, the single-process executor), so a step is a plain call
and a worker with nothing to do sleeps in the loop instead of spinning. Requests go in as
token ids and come out as token ids per step (vLLM's delta outputs, no detokenizing: the
front door does text). vLLM's own checks of a request's parameters run in `validate` and
become RequestErrors.

Disaggregated (a worker of either pool serves both roles), pdserve's connector
(engine/vllm_backend/connector.py) is loaded into the engine:
- prefill role: `set_kv_sink` makes every prompt whose KV a decode worker awaits go to the
  sink, layer by layer, during the forward;
- decode role: `reserve_prefilled` adds the request to receive its prompt's KV and answers
  DEFERRED: vLLM allocates the blocks in its next step, and `allocated()` then names the
  request with the blocks its prefix cache held, for the prefill worker to skip. Chunks
  landing through `receive_kv` are written into vLLM's paged cache between steps; after the
  last one vLLM schedules the request and samples its first token itself from the landed KV
  (recomputing the last prompt token), exactly as vLLM's own disaggregated serving does. So
  greedy and seeded outputs equal vLLM colocated; the prefill worker's first token only marks
  the end of the prefill (`give_first_token`).
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.errors import RequestError
from engine.interface import DEFERRED
from engine.outputs import EngineInfo, EngineStats, StepOutput, Timeline, TokenLogprobs
from engine.request import validate_request
from engine.sampling_params import SamplingParams
from engine.structured_output import StructuredKind, StructuredOutput
from engine.transfer.base import KVSink, LayerChunk
from engine.vllm_backend.args import engine_args
from engine.vllm_backend.bridge import CONSUME, PRODUCE, Bridge
from engine.vllm_backend.model_folder import hf_folder

CONNECTOR = {"kv_connector": "PdserveConnector", "kv_connector_module_path": "engine.vllm_backend.connector",
             "kv_role": "kv_both"}


@dataclass
class _Tracked:
    vllm_id: str
    num_prompt_tokens: int
    timeline: Timeline
    num_logprobs: int | None
    unfinished: set[int] = field(default_factory=set)  # sample indices still running
    num_prompt_logprobs: int = 0
    prompt_logprobs_sent: set[int] = field(default_factory=set)  # samples whose first output carried them


class VllmEngine:
    def __init__(self, config: EngineConfig, disaggregated: bool = False):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the engine core in this process, on our thread
        from vllm.engine.arg_utils import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        self.config = config
        self.bridge = Bridge()
        self._closed = False
        on_cpu = config.device == "cpu" or not torch.cuda.is_available()
        if on_cpu:  # vLLM drops to one torch thread unless OMP_NUM_THREADS says otherwise
            if config.num_threads:
                torch.set_num_threads(config.num_threads)
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
        self._num_threads = torch.get_num_threads() if on_cpu else 0
        self._step_thread: int | None = None
        kw = engine_args(config, str(hf_folder(config.model)), on_cpu)
        if disaggregated:
            kw["kv_transfer_config"] = dict(CONNECTOR, kv_connector_extra_config={"bridge": self.bridge.key})
        self.llm = LLMEngine.from_engine_args(EngineArgs(**kw))
        self.scheduler = self.llm.engine_core.engine_core.scheduler
        self.block_pool = self.scheduler.kv_cache_manager.block_pool
        vc = self.llm.vllm_config
        mc, bs = vc.model_config, vc.cache_config.block_size
        self.max_model_len, self.vocab_size = mc.max_model_len, mc.get_vocab_size()
        self.bridge.block_shape = shape = (bs, mc.get_num_kv_heads(vc.parallel_config), mc.get_head_size())
        kv_dtype = self.bridge.kv_layers[0].dtype if self.bridge.kv_layers else mc.dtype
        device = "cpu" if on_cpu else f"cuda:{torch.cuda.current_device()}"
        self.info = EngineInfo(self.max_model_len, self.vocab_size, bs, self.block_pool.num_gpu_blocks - 1, shape,
                               str(kv_dtype).removeprefix("torch."), device)
        self._requests: dict[str, _Tracked] = {}
        self._unscheduled: set[str] = set()  # requests whose first scheduled step is still to come
        self._queried_tokens = self._hit_tokens = 0

    # requests

    def validate(self, prompt_token_ids: list[int], params: SamplingParams, prefills: bool = True) -> None:
        validate_request(prompt_token_ids, params, self.max_model_len, self.vocab_size)
        if params.kv_prediction:
            raise RequestError("kv_prediction needs pdserve's own engine (--engine pdserve)", param="kv_prediction")
        vparams = self._params(params)
        from vllm.exceptions import VLLMClientError
        checks = self.llm.input_processor
        try:  # what vLLM checks when the request is added (structured-output constraints compile here), done now
            vparams.verify(checks.model_config, checks.speculative_config, checks.structured_outputs_config,
                           checks.tokenizer)
        except (ValueError, VLLMClientError) as e:
            raise RequestError(str(e).split("\n")[0], param=getattr(e, "parameter", None)) from None

    def _params(self, params: SamplingParams, transfer: dict | None = None):
        from vllm import SamplingParams as VllmParams
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind
        try:
            vparams = VllmParams(
                n=params.n, max_tokens=params.max_tokens, min_tokens=params.min_tokens, temperature=params.temperature,
                top_p=params.top_p, top_k=params.top_k, min_p=params.min_p, seed=params.seed,
                repetition_penalty=params.repetition_penalty, presence_penalty=params.presence_penalty,
                frequency_penalty=params.frequency_penalty, stop_token_ids=list(params.stop_token_ids),
                ignore_eos=params.ignore_eos, logprobs=params.logprobs, prompt_logprobs=params.prompt_logprobs,
                detokenize=False,
                output_kind=RequestOutputKind.DELTA, extra_args={"kv_transfer_params": transfer} if transfer else None,
                logit_bias=dict(params.logit_bias) or None, allowed_token_ids=list(params.allowed_token_ids) or None,
                structured_outputs=_structured(params.structured))
        except (ValueError, VLLMClientError) as e:  # vLLM's own checks of the request
            raise RequestError(str(e), param=getattr(e, "parameter", None)) from None
        if params.bad_words_ids:  # tokenized by the front door as vLLM's update_from_tokenizer does; its sampler reads this
            vparams._bad_words_token_ids = [list(w) for w in params.bad_words_ids]
        return vparams

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_s: float | None = None, validated: bool = False) -> None:
        if not validated:
            self.validate(prompt_token_ids, params)
        transfer = {PRODUCE: request_id} if self.bridge.sink is not None else None
        self._add(request_id, prompt_token_ids, params, transfer, Timeline(arrival_s or time.monotonic()))

    def _add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, transfer: dict | None,
             timeline: Timeline) -> None:
        if request_id in self._requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        vllm_params = self._params(params, transfer)
        vllm_id = self.llm.add_request(request_id, {"prompt_token_ids": prompt_token_ids}, vllm_params)
        self._requests[request_id] = _Tracked(vllm_id, len(prompt_token_ids), timeline, params.logprobs,
                                              set(range(params.n)), params.prompt_logprobs or 0)
        self._unscheduled.add(request_id)

    def abort(self, request_id: str, index: int | None = None) -> bool:
        tracked = self._requests.get(request_id)
        if tracked is None:
            return False
        if index is not None and index not in tracked.unfinished:
            return True  # that sample has finished already
        if index is not None and len(tracked.unfinished) > 1:  # one of n samples: its child request
            self.llm.abort_request([f"{index}_{tracked.vllm_id}"], internal=True)
            tracked.unfinished.discard(index)
            return True
        self.llm.abort_request([request_id])
        self._forget(request_id)
        return True

    def _forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self._unscheduled.discard(request_id)
        self.bridge.end(request_id)

    def has_work(self) -> bool:
        parked = sum(i.allocated for i in self.bridge.inbound.values())  # only waiting for their KV
        return bool(self.bridge.loads_done) or self.llm.get_num_unfinished_requests() > parked

    def has_request(self, request_id: str) -> bool:
        return request_id in self._requests

    def num_requests(self) -> int:
        """Ours, and any vLLM's scheduler still holds that is none of ours (a leak check sees them)."""
        ours = {t.vllm_id for t in self._requests.values()}
        leftover = [r for r in self.scheduler.requests if r not in ours and r.partition("_")[2] not in ours]
        return len(self._requests) + len(leftover)

    def step(self) -> list[StepOutput]:
        if self._num_threads and self._step_thread != threading.get_ident():
            # OpenMP's thread count is per thread, and a new thread starts at the core count until
            # torch's first parallel op there sets it: vLLM's CPU attention plans a step with one
            # count and checks it runs with the same, so the stepping thread gets the engine's now
            # (torch's own setter: vLLM replaces torch.set_num_threads with a no-op once it runs)
            torch._C.set_num_threads(self._num_threads)
            self._step_thread = threading.get_ident()
        started = time.monotonic()
        results = self.llm.step()
        now = time.monotonic()
        self._mark_scheduled(started)
        outputs: list[StepOutput] = []
        for result in results:
            tracked = self._requests.get(result.request_id)
            if tracked is None:
                continue
            t = tracked.timeline
            for c in result.outputs:
                if not c.token_ids and c.finish_reason is None:
                    continue
                if t.first_token_s is None:
                    self._first_token(t, now, result.num_cached_tokens or 0, tracked.num_prompt_tokens)
                if c.finish_reason is not None:
                    tracked.unfinished.discard(c.index)
                    t.finish_s = now if not tracked.unfinished else None
                out = StepOutput(result.request_id, c.index, list(c.token_ids), _logprobs(c, tracked.num_logprobs),
                                 c.finish_reason, tracked.num_prompt_tokens, result.num_cached_tokens or 0, t)
                if result.prompt_logprobs and c.index not in tracked.prompt_logprobs_sent:
                    tracked.prompt_logprobs_sent.add(c.index)
                    out.prompt_logprobs = _prompt_logprobs(result.prompt_token_ids, result.prompt_logprobs,
                                                           tracked.num_prompt_logprobs)
                outputs.append(out)
            if not tracked.unfinished:
                self._forget(result.request_id)
        return outputs

    def _mark_scheduled(self, step_start: float) -> None:
        """The step that just ran is the first scheduled one of requests vLLM now computes."""
        for request_id in list(self._unscheduled):
            tracked = self._requests[request_id]
            vllm_id = tracked.vllm_id if len(tracked.unfinished) <= 1 else f"0_{tracked.vllm_id}"
            request = self.scheduler.requests.get(vllm_id)
            if request is None or request.num_computed_tokens > 0 and request_id not in self.bridge.inbound:
                self._unscheduled.discard(request_id)
                t = tracked.timeline
                if t.reserved_s is None:  # a prefill here (a decode's starts when its KV is in)
                    t.first_scheduled_s = t.prefill_start_s = step_start

    def _first_token(self, t: Timeline, now: float, num_cached: int, num_prompt: int) -> None:
        self._queried_tokens += num_prompt
        self._hit_tokens += num_cached
        t.first_token_s = t.decode_start_s = now
        if t.reserved_s is not None:  # prompt KV from a prefill worker
            t.prefill_end_s = t.prefill_end_s or t.kv_last_s or now
            t.first_scheduled_s = t.first_scheduled_s or t.reserved_s
            t.transfer_start_s, t.transfer_end_s = t.prefill_end_s, max(t.kv_last_s or now, t.prefill_end_s)
            t.decode_queued_s = t.transfer_end_s
        else:
            t.first_scheduled_s = t.first_scheduled_s or t.arrival_s
            t.prefill_end_s = now

    def stats(self) -> EngineStats:
        s = self.scheduler
        pending = sum(r.num_prompt_tokens - r.num_computed_tokens for r in s.requests.values()
                      if r.num_computed_tokens < r.num_prompt_tokens and r.request_id not in self._parked())
        total = self.block_pool.num_gpu_blocks - 1  # less vLLM's null block
        return EngineStats(len(s.running), len(s.waiting) + len(s.kv_holding_waiting),
                           total - self.block_pool.get_num_free_blocks(), total, self._queried_tokens,
                           self._hit_tokens, pending)

    def _parked(self) -> set[str]:
        return {i.vllm_id for i in self.bridge.inbound.values() if i.allocated}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.llm.engine_core.shutdown()
            self.bridge.close()

    # disaggregation

    def set_kv_sink(self, sink: KVSink) -> None:
        self.bridge.sink = sink

    def reserve_prefilled(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                          arrival_s: float | None = None, transfer_id: int = 0) -> int | None:
        if params.n != 1:
            raise RequestError("disaggregated serving supports n=1 only", param="n")
        if request_id in self._requests:
            raise RequestError(f"duplicate request id {request_id!r}")
        if -(-len(prompt_token_ids) // self.info.block_size) > self.block_pool.get_num_free_blocks():
            return None
        timeline = Timeline(arrival_s or time.monotonic())
        timeline.reserved_s = time.monotonic()
        inbound = self.bridge.expect(request_id, len(prompt_token_ids), timeline)
        try:
            self._add(request_id, prompt_token_ids, params, {CONSUME: request_id}, timeline)
        except BaseException:
            self.bridge.inbound.pop(request_id, None)
            raise
        inbound.vllm_id = self._requests[request_id].vllm_id
        return DEFERRED

    def open_kv_link(self, link) -> None:
        pass  # one rank: the worker's own link is all there is

    def close_kv_link(self, link_no: int) -> None:
        pass

    def allocated(self) -> list[tuple[str, int]]:
        return self.bridge.take_allocated()

    def waiting_for_kv(self, request_id: str) -> bool:
        inbound = self.bridge.inbound.get(request_id)
        return inbound is not None and not inbound.landed

    def receive_kv(self, chunk: LayerChunk) -> bool:
        inbound = self.bridge.inbound.get(chunk.request_id)
        if inbound is None or not inbound.allocated or inbound.landed:
            return False
        blocks = inbound.block_ids[chunk.first_block:chunk.first_block + chunk.num_blocks]
        assert len(blocks) == chunk.num_blocks, "chunk beyond the reserved blocks"
        layer, dim = self.bridge.kv_layers[chunk.layer], self.bridge.block_dim
        shape = list(layer.shape)
        shape[dim] = len(blocks)
        layer.index_copy_(dim, torch.tensor(blocks, device=layer.device), chunk.packed.reshape(shape))
        t = inbound.timeline
        t.kv_last_s = time.monotonic()
        t.kv_first_s = t.kv_first_s or t.kv_last_s
        t.kv_bytes += chunk.packed.nbytes
        if chunk.last:  # vLLM learns it at the next step and schedules the request
            inbound.landed = True
            self.bridge.loads_done.add(inbound.vllm_id)
            del self.bridge.inbound[chunk.request_id]
        return True

    def give_first_token(self, request_id: str, token_id: int, logprob: TokenLogprobs | None = None,
                         prefill_s: float = 0.0) -> bool:
        tracked = self._requests.get(request_id)
        if tracked is None:
            return False
        t = tracked.timeline
        t.prefill_end_s = time.monotonic()
        t.first_scheduled_s = t.prefill_start_s = max(t.reserved_s or t.arrival_s, t.prefill_end_s - prefill_s)
        return True

    def admit_prefilled(self, request_id: str, first_token_id: int,
                        first_logprob: TokenLogprobs | None = None) -> StepOutput | None:
        return None  # vLLM admits the request itself once its KV is reported loaded


def _logprobs(completion, k: int | None) -> list[TokenLogprobs]:
    """vLLM's per-token dicts (the top k by rank, plus the sampled token) as ours."""
    if not completion.logprobs or k is None:
        return []
    out = []
    for token_id, alternatives in zip(completion.token_ids, completion.logprobs):
        top = sorted((lp.rank, t, lp.logprob) for t, lp in alternatives.items() if lp.rank is not None and lp.rank <= k)
        out.append(TokenLogprobs(token_id, alternatives[token_id].logprob, [(t, lp) for _, t, lp in top]))
    return out


def _prompt_logprobs(prompt: list[int], per_token: list, k: int) -> list[TokenLogprobs | None]:
    """vLLM's prompt logprobs (None for the first token, then a dict per token) as ours."""
    out: list[TokenLogprobs | None] = [None]
    for token_id, alternatives in zip(prompt[1:], per_token[1:]):
        top = sorted((lp.rank, t, lp.logprob) for t, lp in alternatives.items() if lp.rank is not None and lp.rank <= k)
        out.append(TokenLogprobs(token_id, alternatives[token_id].logprob, [(t, lp) for _, t, lp in top]))
    return out


def _structured(spec: StructuredOutput | None):
    """The constraint as vLLM's StructuredOutputsParams (its own backend compiles it)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams
    if spec.kind == StructuredKind.JSON:
        return StructuredOutputsParams(json=spec.spec)
    if spec.kind == StructuredKind.JSON_OBJECT:
        return StructuredOutputsParams(json_object=True)
    if spec.kind == StructuredKind.CHOICE:
        return StructuredOutputsParams(choice=spec.choices)
    return StructuredOutputsParams(**{spec.kind.value: spec.spec})
