"""Prefill role: computes prompts into the blocks that decode workers reserved.

`prefill()` routes the request's KV chunks to the given sink (one per decode peer, e.g. a
GlooSender), runs the prompt for one token and resolves a future with that first token
(its StepOutput) or with the error; cancelling the future aborts the request. The first
token is sampled with the request's own parameters (EOS masked when min_tokens asks for
it), so the decode side continues exactly where colocated serving would.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace

from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from engine.transfer.base import KVSink, LayerChunk
from engine.worker.loop import EngineLoop

log = logging.getLogger(__name__)


class RoutingSink(KVSink):
    """Sends each request's chunks to its decode peer's sink; drops those of unknown ones.
    A failing peer (its link broke: the decode worker died) loses its route and nothing else:
    the prefill finishes and the other requests' KV keeps flowing. Requests with no route
    (prefilled on this worker for its own decode) export nothing."""

    def __init__(self) -> None:
        self.routes: dict[str, KVSink] = {}
        self.held: dict[str, int] = {}  # leading blocks the receiver has cached already

    def blocks_held(self, request_id: str) -> int | None:
        return self.held.get(request_id, 0) if request_id in self.routes else None

    def transfer(self, request_id: str) -> tuple[int, int] | None:
        sink = self.routes.get(request_id)
        return sink.transfer(request_id) if sink is not None else None

    def send(self, chunk: LayerChunk) -> None:
        sink = self.routes.get(chunk.request_id)
        if sink is not None:
            try:
                sink.send(chunk)
            except Exception as e:
                log.warning("KV of %s could not be sent, dropping it: %s", chunk.request_id, e)
                self.drop(chunk.request_id)
        if chunk.last:
            self.drop(chunk.request_id)

    def drop(self, request_id: str) -> None:
        self.routes.pop(request_id, None)
        self.held.pop(request_id, None)


def first_token(loop: EngineLoop, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                on_failure: Callable[[], None] = lambda: None, validated: bool = False) -> "Future[StepOutput]":
    """Runs the prompt on the loop's engine for its first token only, sampled with the request's own
    parameters (EOS masked when min_tokens asks for it). The future holds that StepOutput or
    the error; cancelling it aborts the request. on_failure runs on an error or a cancel.
    Raises at once what `loop.submit` raises."""
    future: Future = Future()

    def on_output(out: "StepOutput | Exception") -> None:
        try:
            if isinstance(out, Exception):
                on_failure()
                future.set_exception(out)
            elif out.finished:
                future.set_result(out)
        except InvalidStateError:
            pass  # cancelled meanwhile

    def on_done(f: Future) -> None:
        if f.cancelled():  # the decode side gave up on it: stop computing (and sending)
            on_failure()
            loop.abort(request_id)

    first_only = replace(params, n=1, max_tokens=1, min_tokens=min(1, params.min_tokens))
    loop.submit(request_id, prompt_token_ids, first_only, on_output, validated=validated)
    future.add_done_callback(on_done)
    return future


class PrefillRole:
    def __init__(self, loop: EngineLoop):
        self.loop = loop
        self.sink = RoutingSink()
        loop.engine.set_kv_sink(self.sink)

    def prefill(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                sink: KVSink, skip_blocks: int = 0) -> "Future[StepOutput]":
        """skip_blocks: leading blocks the receiver has cached (not sent)."""
        self.sink.routes[request_id] = sink
        if skip_blocks:
            self.sink.held[request_id] = skip_blocks
        try:
            return first_token(self.loop, request_id, prompt_token_ids, params, lambda: self.sink.drop(request_id))
        except Exception:
            self.sink.drop(request_id)
            raise

    def owes(self, request_id: str) -> bool:
        """Whether this worker still has KV of the request to send (queued, computing or sending)."""
        return request_id in self.sink.routes

    def abort(self, request_id: str) -> None:
        self.sink.drop(request_id)
        self.loop.abort(request_id)
