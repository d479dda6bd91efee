"""The local event sources: a file followed like tail -F, standard input, and a unix socket with many
producers. Each cuts bytes into lines with feed.lines and never stops on bad input."""

from __future__ import annotations

import asyncio
import logging
import os
import select
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, Literal, NamedTuple

from egressd.common.sockets import SocketPathError, bind_unix, unlink_if_ours
from egressd.feed.lines import (
    DEFAULT_MAX_LINE,
    PARTIAL_DROPPED,
    FeedError,
    FeedStats,
    LineSplitter,
    OnLine,
    deliver,
)

CHUNK_SIZE = 64 * 1024
TRUNCATED_DROPPED = "file truncated in the middle of a line; partial line dropped"
_STDIN_SLOTS = 4  # chunks the stdin reader thread may read ahead of the event loop
_STOP_CHECK = 0.2  # how often the stdin reader thread looks whether it should stop

logger = logging.getLogger(__name__)

# --- file:PATH ---------------------------------------------------------------------------------------------

_TailKind = Literal["data", "opened", "waiting", "idle", "truncated", "rotated", "problem"]


class _TailEvent(NamedTuple):
    kind: _TailKind
    data: bytes = b""
    detail: str = ""


def _path_ident(path: str) -> tuple[int, int] | None:
    """Which file the path names now (following symlinks, as we opened it); None when there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


class _Tail:
    """Follows one path across truncation and rotation with plain syscalls; knows nothing of lines or asyncio.

    Reads are small (one chunk) and on a local regular file, so calling step() on the event loop is cheap.
    """

    def __init__(self, path: str, chunk_size: int) -> None:
        self.path = path
        self.chunk_size = chunk_size
        self.fd: int | None = None
        self.ident: tuple[int, int] | None = None
        self.offset = 0
        self.opens = 0
        self.truncations = 0
        self.rotations = 0

    def step(self) -> _TailEvent:
        """One move: open, read one chunk, or look at what happened at end of file. May raise OSError."""
        if self.fd is None:
            return self._open()
        data = os.read(self.fd, self.chunk_size)
        if data:
            self.offset += len(data)
            return _TailEvent("data", data)
        return self._at_eof(self.fd)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def _open(self) -> _TailEvent:
        try:
            # O_NONBLOCK so that a FIFO put at the path cannot hang the event loop in open().
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            return _TailEvent("waiting", detail=f"waiting for {self.path} to appear")
        except OSError as e:
            return _TailEvent("problem", detail=f"cannot open {self.path}: {e.strerror or e}; retrying")
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return _TailEvent("problem", detail=f"{self.path} is not a regular file; waiting for one")
        self.fd, self.ident, self.offset = fd, (st.st_dev, st.st_ino), 0
        self.opens += 1
        return _TailEvent("opened", detail=f"reading {self.path} (inode {st.st_ino}) from the start")

    def _at_eof(self, fd: int) -> _TailEvent:
        if os.fstat(fd).st_size < self.offset:
            os.lseek(fd, 0, os.SEEK_SET)
            self.offset = 0
            self.truncations += 1
            return _TailEvent(
                "truncated", detail=f"{self.path} was truncated; reading it again from the start"
            )
        now = _path_ident(self.path)
        if now is None:
            return _TailEvent("idle", detail=f"{self.path} was removed; waiting for a new file")
        if now == self.ident:
            return _TailEvent("idle")
        # The path names another file now. A writer may still have appended to the old one since our last
        # read; take that first, so nothing written before the switch is lost.
        data = os.read(fd, self.chunk_size)
        if data:
            self.offset += len(data)
            return _TailEvent("data", data)
        self.close()
        self.rotations += 1
        return _TailEvent("rotated", detail=f"{self.path} was replaced; finished the old file")


class FileSource:
    """file:PATH, followed like `tail -F`, by polling (no inotify dependency)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 0.1,
        max_line: int = DEFAULT_MAX_LINE,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        self.name = f"file:{self.path}"
        self.poll_interval = poll_interval
        self.max_line = max_line
        self._stats = FeedStats(self.name)
        self._tail = _Tail(self.path, chunk_size)
        self._splitter = LineSplitter(self.name, max_line)
        # True once all the file held at the start has been delivered: the daemon waits for it before
        # applying anything, so replaying old lines never puts an old policy in force, not even briefly.
        self.caught_up = False

    async def run(self, on_line: OnLine) -> None:
        """Follow the file until cancelled; each call starts again from the beginning of the file."""
        self._tail = _Tail(self.path, self._tail.chunk_size)
        self._splitter = LineSplitter(self.name, self.max_line)
        self._stats.since = time.time()
        try:
            while True:
                busy = self._step(on_line)
                self.caught_up = self.caught_up or not busy
                # Yield even when busy, so that a large backlog does not starve the rest of the daemon.
                await asyncio.sleep(0 if busy else self.poll_interval)
        finally:
            self._tail.close()

    def health(self) -> dict[str, object]:
        h = self._stats.as_dict()
        t = self._tail
        h.update(
            connected=int(t.fd is not None),
            offset=t.offset,
            opens=t.opens,
            truncations=t.truncations,
            rotations=t.rotations,
            waiting=t.fd is None,
        )
        return h

    def _step(self, on_line: OnLine) -> bool:
        """One move of the tail; True when there may be more to do right away."""
        try:
            ev = self._tail.step()
        except OSError as e:
            self._stats.error(f"reading {self.path}: {e.strerror or e}; retrying")
            return False
        if ev.kind == "data":
            deliver(self._stats, on_line, self._splitter.feed(ev.data))
            self._stats.max_buffered = max(self._stats.max_buffered, self._splitter.max_buffered)
            return True
        if ev.kind in ("truncated", "rotated"):
            partial = TRUNCATED_DROPPED if ev.kind == "truncated" else None
            deliver(self._stats, on_line, [self._splitter.finish(partial)])
            self._splitter.reset()
        if ev.kind == "problem":
            self._stats.error(ev.detail)
        elif ev.detail:
            self._stats.note(ev.detail)
        return ev.kind in ("opened", "truncated", "rotated")


# --- stdin -------------------------------------------------------------------------------------------------

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


# --- unix:PATH ---------------------------------------------------------------------------------------------


class UnixSource:
    """unix:PATH: egressd listens; each connection is its own stream of lines, named unix:PATH#N."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        max_line: int = DEFAULT_MAX_LINE,
        mode: int = 0o600,
        chunk_size: int = CHUNK_SIZE,
    ) -> None:
        self.path = os.fspath(path)
        self.name = f"unix:{self.path}"
        self.max_line = max_line
        self.mode = mode
        self.chunk_size = chunk_size
        self._stats = FeedStats(self.name)
        self._tasks: set[asyncio.Task[None]] = set()
        self._accepted = 0
        self._listening = False

    async def run(self, on_line: OnLine) -> None:
        """Serve until cancelled; FeedError at once if the path cannot be used, never because of input."""
        try:
            sock, ident = bind_unix(self.path, self.mode)
        except SocketPathError as e:
            raise FeedError(f"{self.name}: {e}") from None
        self._stats.since = time.time()
        try:
            await self._serve_on(sock, on_line)
        finally:
            sock.close()  # already closed with the server, unless starting it failed
            unlink_if_ours(self.path, ident)

    def health(self) -> dict[str, object]:
        h = self._stats.as_dict()
        h.update(connected=len(self._tasks), connections=self._accepted, listening=self._listening)
        return h

    async def _serve_on(self, sock: socket.socket, on_line: OnLine) -> None:
        try:
            server = await asyncio.start_unix_server(lambda r, w: self._serve(r, w, on_line), sock=sock)
        except OSError as e:
            raise FeedError(f"unix:{self.path}: cannot serve: {e.strerror or e}") from e
        self._listening = True
        self._stats.note(f"listening on {self.path}")
        try:
            await asyncio.get_running_loop().create_future()  # until cancelled
        finally:
            self._listening = False
            server.close()
            await self._close_connections()

    async def _close_connections(self) -> None:
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, on_line: OnLine
    ) -> None:
        task = asyncio.current_task()
        if not self._listening or task is None:  # accepted while shutting down
            writer.close()
            return
        self._tasks.add(task)
        self._accepted += 1
        splitter = LineSplitter(f"{self.name}#{self._accepted}", self.max_line)
        try:
            await self._read_lines(reader, splitter, on_line)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _read_lines(
        self, reader: asyncio.StreamReader, splitter: LineSplitter, on_line: OnLine
    ) -> None:
        while True:
            try:
                data = await reader.read(self.chunk_size)
            except OSError as e:  # a reset connection ends that stream like a close
                self._stats.error(f"{splitter.source}: {e.strerror or e}")
                data = b""
            if not data:
                deliver(self._stats, on_line, [splitter.finish(PARTIAL_DROPPED)])
                return
            deliver(self._stats, on_line, splitter.feed(data))
            self._stats.max_buffered = max(self._stats.max_buffered, splitter.max_buffered)
