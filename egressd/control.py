"""The status socket: how `egressd status` and `egressd wait` talk to the running agent.

A Unix socket, mode 0600 (root only), speaking one JSON object per line each way. It only reports and
waits; nothing on it changes what is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

MAX_REQUEST = 64 * 1024

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class ControlError(Exception):
    """The agent cannot be reached or answered with an error; the message says what to do."""


def prepare_socket_path(path: str) -> None:
    """Make room for a listening socket at path: remove a stale socket, never anything else."""
    parent = Path(path).parent
    parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlError(f"{path} exists and is not a socket; remove it or choose another [control] socket")
    os.unlink(path)


class ControlServer:
    def __init__(self, path: str, handler: Handler) -> None:
        self.path = path
        self._handler = handler
        self._server: asyncio.Server | None = None
        self._ino: int | None = None

    async def start(self) -> None:
        prepare_socket_path(self.path)
        old = os.umask(0o177)  # the socket is born 0600: no window in which others could connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path, limit=MAX_REQUEST)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        self._ino = os.lstat(self.path).st_ino

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            if self._ino is not None and os.lstat(self.path).st_ino == self._ino:
                os.unlink(self.path)

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
        writer.write(json.dumps(doc, separators=(",", ":"), default=str).encode() + b"\n")
        await writer.drain()


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
