"""Signals the agent never loses, however busy its event loop is.

asyncio's add_signal_handler hears a signal only through the byte the C-level handler writes to the loop's
self-pipe. That pipe also carries a wakeup for every callback another thread hands the loop (each worker's
result, each change monitor opened), and while the loop is busy thousands of them fill it: the signal's byte
is then dropped ("Exception ignored when trying to write to the signal wakeup fd: BlockingIOError") and the
signal with it. Seen at 10,000 sandboxes: a SIGTERM right after READY never stopped the agent. A handler set
with signal.signal() runs in the main thread (the loop's) whatever the pipe holds, and hands its work to the
loop with call_soon_threadsafe, as the asyncio documentation advises for such handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable, Mapping
from types import FrameType


def install(loop: asyncio.AbstractEventLoop, handlers: Mapping[int, Callable[[], object]]) -> None:
    """Run handlers[sig]() on the loop for each signal received. Call from the main thread."""
    for sig, fn in handlers.items():
        signal.signal(sig, _handler(loop, fn))


def _handler(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], object]
) -> Callable[[int, FrameType | None], None]:
    def handle(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the agent is ending anyway
            loop.call_soon_threadsafe(fn)

    return handle
