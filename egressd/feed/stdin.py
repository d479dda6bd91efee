"""stdin, read by a daemon thread so that the event loop never blocks on it, cut into lines with feed.lines;
the end of input ends this source, not the agent."""

from __future__ import annotations

import asyncio
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO

from egressd.feed.lines import CHUNK_SIZE, DEFAULT_MAX_LINE, FeedStats, LineSplitter, OnLine, deliver

_STDIN_SLOTS = 4  # chunks the stdin reader thread may read ahead of the event loop
_STOP_CHECK = 0.2  # how often the stdin reader thread looks whether it should stop

_Chunk = tuple[bytes, OSError | None]


def _wait_readable(fd: int, stop: threading.Event) -> bool:
    """For a stdin someone else made non-blocking: wait for data without spinning; False when told to stop."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not stop.is_set():
        if poller.poll(_STOP_CHECK * 1000):
            return True
    return False


def _read_chunk(fd: int, size: int, stop: threading.Event) -> _Chunk | None:
    """One blocking read for the reader thread; None when it should stop instead."""
    while True:
        try:
            return os.read(fd, size), None
        except BlockingIOError:
            if not _wait_readable(fd, stop):
                return None
        except OSError as e:
            return b"", e


def _pump(
    fd: int, size: int, deliver: Callable[[_Chunk], object], slots: threading.Semaphore, stop: threading.Event
) -> None:
    """Reader thread: blocking reads of stdin handed to the loop, at most a few chunks ahead of it."""
    while True:
        while not slots.acquire(timeout=_STOP_CHECK):
            if stop.is_set():
                return
        chunk = None if stop.is_set() else _read_chunk(fd, size, stop)
        if chunk is None:
            return
        try:
            deliver(chunk)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            return
        if not chunk[0]:
            return


class StdinSource:
    """stdin (a pipe, a file, a tty or /dev/null), read by a daemon thread so the loop never blocks on it.

    `stream` (a binary file object or a file descriptor) stands in for sys.stdin in tests. It is read by
    descriptor, not through the file object's buffer, and never closed by this class.
    """

    name = "stdin"

    def __init__(
        self,
        max_line: int = DEFAULT_MAX_LINE,
        stream: BinaryIO | int | None = None,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.max_line = max_line
        self.chunk_size = chunk_size
        self._stream = stream
        self._stats = FeedStats(self.name)
        self._splitter = LineSplitter(self.name, max_line)
        self.ended = False
        self._reading = False

    async def run(self, on_line: OnLine) -> None:
        """Deliver lines until end of input, then return normally; the daemon goes on enforcing."""
        self._stats.since = time.time()
        fd = self._fileno()
        if fd is None:
            self._end(on_line)
            return
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[_Chunk] = asyncio.Queue()
        slots, stop = threading.Semaphore(_STDIN_SLOTS), threading.Event()
        args = (fd, self.chunk_size, lambda c: loop.call_soon_threadsafe(queue.put_nowait, c), slots, stop)
        threading.Thread(target=_pump, args=args, name="egressd-feed-stdin", daemon=True).start()
        self._reading = True
        try:
            await self._consume(queue, slots, on_line)
        finally:
            self._reading = False
            stop.set()

    def health(self) -> dict[str, object]:
        h = self._stats.as_dict()
        h.update(connected=int(self._reading), ended=self.ended)
        return h

    async def _consume(
        self, queue: asyncio.Queue[_Chunk], slots: threading.Semaphore, on_line: OnLine
    ) -> None:
        while True:
            data, err = await queue.get()
            slots.release()
            if not data:
                if err is not None:
                    self._stats.error(f"reading stdin: {err.strerror or err}; treating it as the end")
                self._end(on_line)
                return
            deliver(self._stats, on_line, self._splitter.feed(data))
            self._stats.max_buffered = max(self._stats.max_buffered, self._splitter.max_buffered)

    def _fileno(self) -> int | None:
        stream = self._stream if self._stream is not None else sys.stdin
        if isinstance(stream, int):
            return stream
        try:
            return stream.fileno()
        except (AttributeError, ValueError, OSError) as e:  # stdin closed, None, or not a real file
            self._stats.error(f"no usable stdin ({e}); nothing to read")
            return None

    def _end(self, on_line: OnLine) -> None:
        # Like the end of a file: a last line without its newline is still a line.
        deliver(self._stats, on_line, [self._splitter.finish()])
        self.ended = True
        self._stats.note("stdin ended; no more events from it")
