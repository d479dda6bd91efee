"""unix:PATH: a unix socket egressd listens on, for many producers, each connection its own stream of lines
(cut with feed.lines); a path that cannot be used is a FeedError at once, bad input never is."""

from __future__ import annotations

import asyncio
import os
import socket
import time

from egressd.common.sockets import SocketPathError, bind_unix, unlink_if_ours
from egressd.feed.lines import (
    CHUNK_SIZE,
    DEFAULT_MAX_LINE,
    PARTIAL_DROPPED,
    FeedError,
    FeedStats,
    LineSplitter,
    OnLine,
    deliver,
)


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
