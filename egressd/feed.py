"""The event feed: newline-delimited lines from a file, stdin or a unix socket, each with where it came from.

The feed only cuts bytes into lines; the daemon parses them (egressd.policy.parse_event). Whatever arrives,
a source never stops or raises because of its input: an overlong, undecodable or cut-off line becomes a
refused `Line` that says why, and memory per stream stays bounded by `max_line` plus one read chunk, however
long a line grows.
"""

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
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO, Literal, NamedTuple, Protocol

from egressd.config import NatsFeed
from egressd.logs import log
from egressd.policy import DEFAULT_MAX_ENTRIES, Event, PolicyError
from egressd.sockets import SocketPathError, bind_unix, unlink_if_ours

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB
CHUNK_SIZE = 64 * 1024
PARTIAL_DROPPED = "connection closed in the middle of a line; partial line dropped"
TRUNCATED_DROPPED = "file truncated in the middle of a line; partial line dropped"
UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL
_STDIN_SLOTS = 4  # chunks the stdin reader thread may read ahead of the event loop
_STOP_CHECK = 0.2  # how often the stdin reader thread looks whether it should stop

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Line:
    """One line and its provenance, so that every report about it can say exactly where it came from."""

    source: str
    lineno: int  # for a bucket key: the KV revision
    text: str | None
    error: str | None = None
    key: str | None = None  # the bucket key, for a nats:// source
    event: Event | PolicyError | None = None  # already parsed, for a source that validates its own records


OnLine = Callable[[Line], None]


class FeedError(ValueError):
    """A source spec or socket path that cannot be used; the message says what to write or do instead."""


class Source(Protocol):
    """What the daemon runs: one task per source, cancelled at shutdown."""

    name: str

    async def run(self, on_line: OnLine) -> None: ...

    def health(self) -> dict[str, object]: ...


class LineSplitter:
    """Cuts one byte stream into Lines while holding at most `max_line` bytes of an unfinished line.

    A producer can be broken or hostile (a line that never ends), so an overlong line is thrown away as it
    arrives instead of accumulated, and reported once, when its newline finally comes.
    """

    def __init__(self, source: str, max_line: int = DEFAULT_MAX_LINE) -> None:
        if max_line < 1:
            raise ValueError(f"max_line must be at least 1, not {max_line}")
        self.source = source
        self.max_line = max_line
        self.lineno = 0
        self.max_buffered = 0
        self._buf = bytearray()
        self._skipping = False

    @property
    def buffered(self) -> int:
        """Bytes of the unfinished line held right now (tests use it to prove memory stays bounded)."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Line]:
        """Every line completed by `data`, in order; blank lines are counted but not returned."""
        out: list[Line] = []
        pos = 0
        while pos < len(data):
            nl = data.find(b"\n", pos)
            if nl < 0:
                self._hold(data, pos)
                break
            line = self._complete(data, pos, nl)
            if line is not None:
                out.append(line)
            pos = nl + 1
        return out

    def finish(self, partial_error: str | None = None) -> Line | None:
        """End of stream: the unfinished line as a Line, or refused with `partial_error` when one is given."""
        if not self._skipping and not self._buf.strip():
            self._drop_partial()
            return None
        self.lineno += 1
        if self._skipping:
            line: Line | None = self._too_long()
        elif partial_error is not None:
            line = self._refuse(partial_error)
        else:
            line = self._decode(bytes(self._buf))
        self._drop_partial()
        return line

    def reset(self) -> None:
        """Start a new generation (a truncated or replaced file): no partial line, numbering from 1 again."""
        self._drop_partial()
        self.lineno = 0

    def _hold(self, data: bytes, pos: int) -> None:
        if self._skipping:
            return
        if len(self._buf) + len(data) - pos > self.max_line:
            self._drop_partial()
            self._skipping = True
            return
        self._buf += memoryview(data)[pos:]
        self.max_buffered = max(self.max_buffered, len(self._buf))

    def _complete(self, data: bytes, pos: int, nl: int) -> Line | None:
        self.lineno += 1
        if self._skipping or len(self._buf) + nl - pos > self.max_line:
            self._drop_partial()
            return self._too_long()
        raw = bytes(self._buf) + data[pos:nl] if self._buf else data[pos:nl]
        self._buf.clear()
        return self._decode(raw)

    def _decode(self, raw: bytes) -> Line | None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return self._refuse(f"not valid UTF-8 ({e.reason} at byte {e.start + 1}); skipped")
        if not text.strip():
            return None
        return Line(self.source, self.lineno, text)

    def _too_long(self) -> Line:
        return self._refuse(f"line {self.lineno} longer than {self.max_line} bytes; skipped")

    def _refuse(self, error: str) -> Line:
        return Line(self.source, self.lineno, None, error)

    def _drop_partial(self) -> None:
        self._buf = bytearray()
        self._skipping = False


class FeedStats:
    """Counters behind health(); mutated only on the event loop thread."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.lines = 0
        self.rejected = 0
        self.callback_errors = 0
        self.last_error: str | None = None
        self.last_note: str | None = None
        self.since: float | None = None
        self.max_buffered = 0

    def error(self, message: str) -> None:
        """A problem with the source itself (not a line); logged because nobody else will report it."""
        if message != self.last_error:
            log(logging.WARNING, "feed_problem", source=self.source, error=message)
        self.last_error = message

    def note(self, message: str) -> None:
        """A state change worth seeing in health and logs (waiting, opened, rotated); logged once."""
        if message != self.last_note:
            log(logging.INFO, "feed_note", source=self.source, detail=message)
        self.last_note = message

    def as_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "lines": self.lines,
            "rejected": self.rejected,
            "callback_errors": self.callback_errors,
            "last_error": self.last_error,
            "last_note": self.last_note,
            "since": self.since,
            "max_buffered": self.max_buffered,
        }


def deliver(stats: FeedStats, on_line: OnLine, lines: Iterable[Line | None]) -> None:
    """Hand lines to the daemon; a handler that raises is logged and counted: it never stops the feed."""
    for line in lines:
        if line is None:
            continue
        if line.error is None:
            stats.lines += 1
        else:
            stats.rejected += 1
            stats.last_error = f"{line.source}:{line.lineno}: {line.error}"
        try:
            on_line(line)
        except Exception:
            stats.callback_errors += 1
            logger.exception(
                "feed_handler_failed", extra={"fields": {"source": line.source, "line": line.lineno}}
            )


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


# --- specs -------------------------------------------------------------------------------------------------

_FORMS = (
    "file:PATH (follow a file, like tail -F), stdin, unix:PATH (listen on a unix socket), or nats://HOST:PORT"
    " (watch a NATS key-value bucket)"
)


def _path_of(spec: str, kind: str) -> str:
    path = spec[len(kind) + 1 :]
    if not path:
        raise FeedError(f"event source {spec!r} has no path; write {kind}:/path/to/it")
    if "\0" in path:
        raise FeedError(f"event source {spec!r}: the path contains a NUL byte")
    return path


def parse_source(
    spec: str,
    *,
    max_line: int = DEFAULT_MAX_LINE,
    nats: NatsFeed | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Source:
    """The source a spec names; FeedError names the accepted forms when it names none."""
    if spec.startswith(("nats://", "tls://")):
        from egressd.fleet import NatsSource  # a separate module: only fleet hosts load the NATS client

        return NatsSource(spec, nats or NatsFeed(), max_value=max_line, max_entries=max_entries)
    if spec == "stdin":
        return StdinSource(max_line=max_line)
    if spec.startswith("file:"):
        return FileSource(_path_of(spec, "file"), max_line=max_line)
    if spec.startswith("unix:"):
        path = _path_of(spec, "unix")
        size = len(os.fsencode(path))
        if size > UNIX_PATH_MAX:
            raise FeedError(
                f"unix socket path {path!r} is {size} bytes, the kernel allows at most {UNIX_PATH_MAX};"
                " choose a shorter one, such as unix:/run/egressd/feed.sock"
            )
        return UnixSource(path, max_line=max_line)
    hint = f"; for a path, write file:{spec} or unix:{spec}" if spec.startswith(("/", ".")) else ""
    raise FeedError(f"unknown event source {spec!r}: write {_FORMS}{hint}")
