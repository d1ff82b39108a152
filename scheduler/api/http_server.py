"""The HTTP server around the app: uvicorn with a deadline on each request head and a
shutdown that drains.

A connection that opens (or finishes a response) and does not complete the next request's
head within the header timeout is closed, however slowly it trickles bytes. On shutdown the
listeners close, in-flight requests get the drain timeout to finish, and what is left is
ended by the app (`ServerState.close`: streams get an error event and [DONE], others a JSON
503) before uvicorn cancels anything.
"""

from __future__ import annotations

import asyncio
import time

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from scheduler.api.limits import FrontDoorLimits

CLOSE_GRACE_S = 2.0  # after the drain: how long ended requests get to flush their last bytes


def _protocol(header_timeout_s: float) -> type[H11Protocol]:
    class HeadDeadline(H11Protocol):
        """h11 with the request head bounded in time."""

        _deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            self._arm()  # the next head; a pipelined one already buffered disarms it at once
            super().on_response_complete()

        def handle_events(self) -> None:
            cycle = self.cycle
            super().handle_events()
            if self.cycle is not cycle:  # a complete head arrived
                self._disarm()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(header_timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expire(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeadDeadline


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, limits: FrontDoorLimits):
        super().__init__(config)
        self.limits = limits

    async def shutdown(self, sockets=None) -> None:
        for server in self.servers:
            server.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()  # idle ones close now, busy ones after their response
        state = getattr(self.config.app, "state", None)
        pd = getattr(state, "pd", None) if state is not None else None
        deadline = time.monotonic() + self.limits.drain_timeout_s
        while self.server_state.tasks and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)
        if pd is not None:
            pd.close()
        self.config.timeout_graceful_shutdown = CLOSE_GRACE_S
        await super().shutdown(sockets)


def make_server(app, host: str, port: int, limits: FrontDoorLimits = FrontDoorLimits(),
                log_level: str = "warning", access_log: bool = True) -> DrainingServer:
    """The server `pdserve serve` runs, and tests start: call `.run()` (blocks) or set
    `.should_exit` to stop it. Logs go through the process's logging set-up (one format)."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=_protocol(limits.header_timeout_s),
                            timeout_keep_alive=limits.keep_alive_timeout_s, access_log=access_log, log_config=None)
    return DrainingServer(config, limits)
