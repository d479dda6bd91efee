"""The status socket: how `egressd status`, `wait` and `explain` talk to the running agent.

A Unix socket, mode 0600 (root only), speaking one JSON object per line each way. It only reports, waits
and explains; nothing on it changes what is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from egressd.common.sockets import SocketPathError, bind_unix, unlink_if_ours

MAX_REQUEST = 64 * 1024
SEND_CHUNK = 256 * 1024  # a streamed answer waits for the reader whenever this much is buffered


class Streamed:
    """A list in an answer, encoded and sent one item at a time: `status` of 1,000 sandboxes naming 10,000
    host names took over 100 MiB when built whole, and the agent kept that memory after. The items are made
    as they are taken (each must be complete in itself: the agent goes on working while the answer is sent).
    """

    def __init__(self, items: Iterable[Any]) -> None:
        self.items = items


Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent cannot be reached or answered with an error; the message says what to do."""


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._ident: tuple[int, int] | None = None

    async def start(self) -> None:
        try:
            sock, self._ident = bind_unix(self.path, 0o600)
        except SocketPathError as e:
            raise ControlError(f"[control] socket: {e}") from None
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_REQUEST)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._ident is not None:
            unlink_if_ours(self.path, self._ident)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, {"error": f"request longer than {MAX_REQUEST} bytes"})
                    return
                if not line:
                    return
                try:
                    request = json.loads(line)
                    if not isinstance(request, dict):
                        raise ValueError("a request is a JSON object")
                except ValueError as e:
                    await self._send(writer, {"error": f"bad request: {e}"})
                    continue
                await self._send(writer, await self._handler(request))
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, doc: dict[str, Any]) -> None:
        """One line of JSON; the Streamed lists in it are written item by item, the line the same."""
        plain = {k: v for k, v in doc.items() if not isinstance(v, Streamed)}
        writer.write(_dumps(plain)[:-1])  # the object open, for the streamed keys to follow
        comma = bool(plain)
        for key, value in doc.items():
            if not isinstance(value, Streamed):
                continue
            writer.write(b"," * comma + _dumps(key) + b":[")
            comma = True
            for i, item in enumerate(value.items):
                writer.write(b"," * bool(i) + _dumps(item))
                if writer.transport.get_write_buffer_size() >= SEND_CHUNK:
                    await writer.drain()
            writer.write(b"]")
        writer.write(b"}\n")
        await writer.drain()


def _dumps(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":"), default=str).encode()


def request(path: str, doc: dict[str, Any], timeout: float = 5.0) -> dict[str, Any]:
    """Send one request to the agent and return its answer."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise ControlError(
                f"egressd is not running: no control socket at {path} "
                "(start it with `systemctl start egressd`, or pass the agent's --config)"
            ) from None
        except ConnectionRefusedError:
            raise ControlError(
                f"egressd is not listening on {path}: a stale socket; is the agent running?"
            ) from None
        except PermissionError:
            raise ControlError(f"{path}: permission denied; the control socket is root only") from None
        sock.sendall(json.dumps(doc).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise ControlError("egressd closed the control connection without an answer")
            buf += chunk
    except TimeoutError:
        raise ControlError(f"no answer from egressd on {path} within {timeout:g} s") from None
    finally:
        sock.close()
    answer = json.loads(buf)
    if "error" in answer:
        raise ControlError(f"egressd: {answer['error']}")
    return answer
