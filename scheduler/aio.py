"""Async iteration with bounds: an iterator ended early when an event is set or when its
next item takes too long. Closing it cancels the pending step first, so the iterator's own
clean-up (an abort in the engine, a cancelled RPC) always runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import TypeVar

T = TypeVar("T")
_END = object()


async def until(items: AsyncIterator[T], stop: asyncio.Event, stopped: Callable[[], Exception],
                idle_timeout_s: float = 0.0, idle: Callable[[], Exception] | None = None) -> AsyncIterator[T]:
    """items until they end; raises stopped() once `stop` is set and idle() when an item after
    the first takes longer than idle_timeout_s (0: no bound; the first may wait in a queue).
    Either way items is closed first."""
    waiter = asyncio.ensure_future(stop.wait())
    step: asyncio.Future | None = None
    first = True
    try:
        while True:
            step = asyncio.ensure_future(anext(items, _END))
            timeout = None if first or not idle_timeout_s else idle_timeout_s
            done, _ = await asyncio.wait({step, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            if step not in done:
                raise stopped() if waiter in done or idle is None else idle()
            item, step, first = step.result(), None, False
            if item is _END:
                return
            yield item
    finally:
        waiter.cancel()
        if step is not None and not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await items.aclose()
