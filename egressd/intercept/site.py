"""One sandbox's DNS proxy endpoint: its sockets served from the agent's loop, with the limits that keep a
flooding sandbox from slowing the others (a query rate, queries in flight, TCP connections and their idle
time). What a query gets is decided elsewhere: `answer` is handed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable

from egressd.kernel.dnssock import ProxySockets, recv_queries, send_reply
from egressd.model.config import Intercept

DATAGRAMS_PER_WAKE = 64  # then the loop serves others before reading more
# (the query's wire form, its transport) -> the reply's wire form for a client taking at most max bytes,
# or None: nothing is sent
Answer = Callable[[bytes, int], Awaitable[bytes | None]]


class TokenBucket:
    """`rate` queries per second, in bursts of as many."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.at = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.rate, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Site:
    """Serves one sandbox's proxy sockets until closed."""

    def __init__(
        self, sid: str, sockets: ProxySockets, limits: Intercept, answer: Answer, counts: Counter[str]
    ):
        self.sid = sid
        self.sockets = sockets
        self.limits = limits
        self._answer = answer
        self._counts = counts
        self._bucket = TokenBucket(limits.query_rate)
        self._inflight = 0
        self._tcp_open = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._servers: list[asyncio.Server] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        for sock in self.sockets.udp:
            self._loop.add_reader(sock.fileno(), self._readable, sock)
        for sock in self.sockets.tcp:
            self._servers.append(await asyncio.start_server(self._serve_tcp, sock=sock))

    def close(self) -> None:
        if self._loop is not None:
            for sock in self.sockets.udp:
                with contextlib.suppress(ValueError, OSError):
                    self._loop.remove_reader(sock.fileno())
        for server in self._servers:
            server.close()
        for task in self._tasks:
            task.cancel()
        self.sockets.close()

    def _admit(self) -> bool:
        """The rate and in-flight limits: a query over them is dropped, and the client asks again."""
        if self._inflight >= self.limits.max_inflight or not self._bucket.take():
            self._counts["rate_limited"] += 1
            return False
        return True

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _readable(self, sock: socket.socket) -> None:
        for data, sender, local in recv_queries(sock, DATAGRAMS_PER_WAKE):
            if self._admit():
                self._spawn(self._udp_query(sock, data, sender, local))

    async def _udp_query(self, sock: socket.socket, data: bytes, sender: tuple, local: str) -> None:
        self._inflight += 1
        try:
            out = await self._answer(data, 0)
        finally:
            self._inflight -= 1
        if out is not None:
            send_reply(sock, out, sender, local)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Length-prefixed queries, one at a time, until the client closes or is idle too long."""
        if self._tcp_open >= self.limits.tcp_connections:
            self._counts["rate_limited"] += 1
            writer.close()
            return
        self._tcp_open += 1
        try:
            while True:
                async with asyncio.timeout(self.limits.tcp_idle_timeout):
                    (size,) = struct.unpack("!H", await reader.readexactly(2))
                    data = await reader.readexactly(size)
                if not self._admit():
                    continue
                self._inflight += 1
                try:
                    out = await self._answer(data, 65535)
                finally:
                    self._inflight -= 1
                if out is None:
                    break
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError, struct.error):
            pass
        finally:
            self._tcp_open -= 1
            writer.close()
