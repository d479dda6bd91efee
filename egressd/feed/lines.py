"""The event feed: newline-delimited lines from a file, stdin or a unix socket, each with where it came from.

The feed only cuts bytes into lines; the daemon parses them (model.events.parse_event). Whatever arrives, a
source never stops or raises because of its input: an overlong, undecodable or cut-off line becomes a
refused `Line` that says why, and memory per stream stays bounded by `max_line` plus one read chunk, however
long a line grows.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from egressd.common.logs import log
from egressd.model.events import Event
from egressd.model.sandbox import PolicyError

DEFAULT_MAX_LINE = 1 << 20  # 1 MiB
CHUNK_SIZE = 64 * 1024  # one read of a local source (file, stdin, unix socket)
PARTIAL_DROPPED = "connection closed in the middle of a line; partial line dropped"

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
