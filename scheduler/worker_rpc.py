"""The scheduler side's gRPC client of workers: the front door's token streams and the global
scheduler's load polls. Messages are converted by engine/worker/wire.py; callers see engine
types (StepOutput, SamplingParams) and policy snapshots (WorkerLoad).

Channels are opened once per worker address and reused; a worker restarted by Ray comes
back at a new address, so a stale channel is simply never asked again (and closed).
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from engine.errors import EngineError, failure
from engine.outputs import StepOutput
from engine.sampling_params import SamplingParams
from engine.worker import wire
from pdserve_rpc import worker_pb2 as pb
from pdserve_rpc import worker_pb2_grpc as pb_grpc
from scheduler.policies import WorkerLoad


class WorkerFailed(EngineError):
    """The worker could not be reached or went away mid-call (HTTP 502 / an error event)."""

    status_code = 502

    def __init__(self, worker_id: str, message: str):
        super().__init__(message)
        self.worker_id = worker_id


class _Stubs:
    """One channel and stub per worker address, opened on first use (sync or asyncio channels)."""

    def __init__(self, open_channel) -> None:
        self.open_channel = open_channel
        self.channels: dict = {}
        self.stubs: dict[str, pb_grpc.WorkerStub] = {}

    def get(self, address: str) -> pb_grpc.WorkerStub:
        stub = self.stubs.get(address)
        if stub is None:
            self.channels[address] = channel = self.open_channel(address)
            self.stubs[address] = stub = pb_grpc.WorkerStub(channel)
        return stub

    def pop(self, address: str):
        """Forgets the address; returns its channel (for the caller to close), if any."""
        self.stubs.pop(address, None)
        return self.channels.pop(address, None)


class StreamClient:
    """Front door: streams a request's tokens from its decode worker (asyncio)."""

    def __init__(self) -> None:
        self._stubs = _Stubs(grpc.aio.insecure_channel)

    async def generate(self, decode_id: str, decode_address: str, prefill_id: str, prefill_address: str,
                       request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams) -> AsyncIterator[StepOutput]:
        """Yields StepOutputs until the request finishes; closing the iterator cancels the call,
        which aborts the request on the decode worker (and its prefill)."""
        request = wire.generate_request(request_id, prompt_token_ids, params, prefill_id, prefill_address)
        call = self._stubs.get(decode_address).Generate(request)
        try:
            async for delta in call:
                if delta.finish_reason == "error":
                    raise failure(delta.error, delta.error_status or 500)
                yield wire.delta_to_output(delta)
        except grpc.aio.AioRpcError as e:
            if e.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
                raise WorkerFailed(decode_id, f"decode worker {decode_id} failed: {e.details()}") from None
            raise wire.typed_error(e, f"decode worker {decode_id}") from None
        finally:
            call.cancel()

    async def forget(self, address: str) -> None:
        channel = self._stubs.pop(address)
        if channel is not None:
            await channel.close()

    async def close(self) -> None:
        for address in list(self._stubs.channels):
            await self.forget(address)


class LoadClient:
    """Global scheduler: polls every worker's load snapshot (thread-based)."""

    def __init__(self) -> None:
        self._stubs = _Stubs(grpc.insecure_channel)

    def poll(self, addresses: list[str], timeout_s: float) -> dict[str, "tuple[WorkerLoad, str] | Exception"]:
        """Asks all at once; returns each address's (snapshot, incarnation) or the error."""
        calls = {a: self._stubs.get(a).Load.future(pb.LoadRequest(), timeout=timeout_s) for a in addresses}
        out: dict[str, tuple[WorkerLoad, str] | Exception] = {}
        for address, call in calls.items():
            try:
                m = call.result()
            except grpc.RpcError as e:
                out[address] = e
                continue
            out[address] = (WorkerLoad.from_stats(m.worker_id, wire.stats_from_proto(m), m.block_size, m.wait_room), m.incarnation)
        return out

    def forget(self, address: str) -> None:
        channel = self._stubs.pop(address)
        if channel is not None:
            channel.close()
