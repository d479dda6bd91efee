"""file:PATH, followed like `tail -F` across truncation and rotation: a tail that knows only syscalls, and
the source that cuts what it reads into lines with feed.lines and never stops on bad input."""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from typing import Literal, NamedTuple

from egressd.feed.dirwatch import DirWatch
from egressd.feed.lines import CHUNK_SIZE, DEFAULT_MAX_LINE, FeedStats, LineSplitter, OnLine, deliver

TRUNCATED_DROPPED = "file truncated in the middle of a line; partial line dropped"

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
    """file:PATH, followed like `tail -F`: told of changes by inotify (dirwatch.py), and polled as well."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        poll_interval: float = 0.1,
        max_line: int = DEFAULT_MAX_LINE,
        chunk_size: int = CHUNK_SIZE,
        inotify: bool = True,
    ) -> None:
        self.path = os.fspath(path)
        self.inotify = inotify  # False: the poll alone
        self.name = f"file:{self.path}"
        self.poll_interval = poll_interval
        self.max_line = max_line
        self._stats = FeedStats(self.name)
        self._tail = _Tail(self.path, chunk_size)
        self._splitter = LineSplitter(self.name, max_line)
        # True once all the file held at the start has been delivered: the daemon waits for it before
        # applying anything, so replaying old lines never puts an old policy in force, not even briefly.
        self.caught_up = False
        self._watched: str | None = None  # the real path the watch was made for

    async def run(self, on_line: OnLine) -> None:
        """Follow the file until cancelled; each call starts again from the beginning of the file."""
        self._tail = _Tail(self.path, self._tail.chunk_size)
        self._splitter = LineSplitter(self.name, self.max_line)
        self._stats.since = time.time()
        changed = asyncio.Event()
        watch = self._watch(changed)
        opens = 0
        try:
            while True:
                changed.clear()  # before the step: a change during it wakes the wait below at once
                busy = self._step(on_line)
                if self._tail.opens != opens:  # a file opened under the path: it may be somewhere else now
                    opens = self._tail.opens
                    watch = self._rewatch(watch, changed)
                self.caught_up = self.caught_up or not busy
                # Yield even when busy, so that a large backlog does not starve the rest of the daemon.
                if busy:
                    await asyncio.sleep(0)
                else:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(changed.wait(), self.poll_interval)
        finally:
            self._tail.close()
            self._unwatch(watch)

    def _watch(self, changed: asyncio.Event) -> DirWatch | None:
        """inotify on the file's directory (and its target's, for a symlink), setting `changed`; None: the
        poll alone (said once in the feed's notes)."""
        if not self.inotify:
            return None
        where = os.path.abspath(self.path)
        real = self._watched = os.path.realpath(where)
        dirs = [os.path.dirname(where), os.path.dirname(real)]
        watch, why = DirWatch.open(dirs, [os.path.basename(where), os.path.basename(real)])
        if watch is None:
            self._stats.note(f"{self.path}: {why}; polling every {self.poll_interval:g} s")
            return None

        def readable() -> None:
            if watch.drain():
                changed.set()

        asyncio.get_running_loop().add_reader(watch.fd, readable)
        return watch

    def _rewatch(self, watch: DirWatch | None, changed: asyncio.Event) -> DirWatch | None:
        """A symlinked feed pointed at a file in another directory: watch that directory instead, or its
        appends would only be polled."""
        if not self.inotify or os.path.realpath(self.path) == self._watched:
            return watch
        self._unwatch(watch)
        return self._watch(changed)

    @staticmethod
    def _unwatch(watch: DirWatch | None) -> None:
        if watch is not None:
            asyncio.get_running_loop().remove_reader(watch.fd)
            watch.close()

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
