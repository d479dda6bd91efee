"""A real nats-server with JetStream on loopback, and a synchronous KV client, for integration tests.

The agent's NATS feed is tested against the real server rather than a fake so that reconnects, JetStream
file storage and KV semantics (revisions, delete markers, purges) behave exactly as in production.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from tests.loopback import free_port

T = TypeVar("T")

NATS_SERVER = shutil.which("nats-server") or "/usr/sbin/nats-server"
HOST = "127.0.0.1"
STREAM_NAME_IN_USE = 10058  # JetStream error code: stream exists with a different configuration


class NatsServer:
    """One nats-server process with JetStream, whose port and store survive restarts."""

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        config: str = "",
        client_options: dict[str, Any] | None = None,
    ) -> None:
        # `config`: nats-server.conf text (authorization, tls) under the flags below; `client_options`:
        # nats.connect arguments that satisfy it, for the readiness probe and for KvClient(server=...).
        self.config = config
        self.client_options = client_options or {}
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        # Fixed for the object's lifetime: clients reconnect to the same URL after a restart.
        self.port = port if port is not None else free_port()
        self.store_dir = self.dir / "jetstream"
        self.log_path = self.dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's log, for error messages that say why it failed."""
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return "(no log)"

    def start(self, timeout: float = 10.0) -> NatsServer:
        """Run the server and return once *this* process serves clients and JetStream answers."""
        if self.running():
            return self
        self.store_dir.mkdir(parents=True, exist_ok=True)
        # The log is appended to across restarts: only lines written after this offset are this run's.
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        conf: list[str] = []
        if self.config:
            path = self.dir / "nats-server.conf"
            path.write_text(self.config)
            conf = ["-c", str(path)]
        self.proc = subprocess.Popen(
            [
                NATS_SERVER,
                *conf,
                "-js",
                "-a",
                HOST,
                "-p",
                str(self.port),
                "-sd",
                str(self.store_dir),
                "-l",
                str(self.log_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        try:
            # The log line proves it is our process that listens: a TCP connect alone could reach another
            # server already holding the port.
            self._wait(deadline, self._logged_ready, offset)
            self._wait(deadline, self._port_open)
            self._wait(deadline, self._jetstream_ready)
        except RuntimeError:
            self.stop(timeout=5)
            raise
        return self

    def _wait(self, deadline: float, check: Any, *args: Any) -> None:
        """Poll `check` until true; fail fast if the server exits, and with the log tail on timeout."""
        while True:
            if self.proc is None or self.proc.poll() is not None:
                code = None if self.proc is None else self.proc.returncode
                raise RuntimeError(
                    f"nats-server on port {self.port} exited with {code} during startup:\n{self.log_tail()}"
                )
            remaining = deadline - time.monotonic()
            if check(*args, timeout=max(0.1, min(remaining, 2.0))):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"nats-server on port {self.port} not ready ({check.__name__}) in time:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _logged_ready(self, offset: int, timeout: float) -> bool:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                return b"Server is ready" in f.read()
        except FileNotFoundError:
            return False

    def _port_open(self, timeout: float) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=timeout):
                return True
        except OSError:
            return False

    def _jetstream_ready(self, timeout: float) -> bool:
        async def quiet(err: Exception) -> None:
            pass

        async def probe() -> None:
            nc = await nats.connect(
                self.url,
                allow_reconnect=False,
                connect_timeout=timeout,
                max_reconnect_attempts=0,
                error_cb=quiet,  # a refused probe is expected while starting: no traceback on stderr
                **self.client_options,
            )
            try:
                await nc.jetstream(timeout=timeout).account_info()
            finally:
                await nc.close()

        try:
            asyncio.run(asyncio.wait_for(probe(), timeout))
        except (OSError, TimeoutError, nats.errors.Error):
            return False
        return True

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL if it lingers; safe to call twice or before start."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def kill(self) -> None:
        """Crash the server (no clean shutdown), as a power cut would."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def __enter__(self) -> NatsServer:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


class KvClient:
    """A blocking JetStream KV client, so synchronous tests can drive the bucket the agent watches.

    nats-py is asyncio-only; this owns an event loop in a daemon thread and waits on each call with a
    timeout, so a call made while the server is down raises instead of hanging the test.
    """

    def __init__(
        self,
        url: str,
        bucket: str = "egressd-sandboxes",
        create: bool = True,
        timeout: float = 10.0,
        options: dict[str, Any] | None = None,
    ) -> None:
        self.url = url
        self.options = options or {}  # more nats.connect arguments: credentials, TLS
        self.bucket = bucket
        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"kv-{bucket}", daemon=True)
        self._thread.start()
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self.errors: list[Exception] = []
        try:
            self._run(self._connect(create))
        except BaseException:
            self.close()
            raise

    async def _connect(self, create: bool) -> None:
        self._nc = await nats.connect(
            self.url,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.2,
            connect_timeout=min(self.timeout, 2.0),
            # No buffering while disconnected: a put that failed must not land later, when the buffer is
            # flushed on reconnect (nats-py's default 2 MB buffer does exactly that).
            pending_size=0,
            error_cb=self._on_error,
            **self.options,
        )
        self._js = self._nc.jetstream(timeout=self.timeout)
        if create:
            try:
                self._kv = await self._js.create_key_value(bucket=self.bucket, history=1)
            except nats.js.errors.BadRequestError as err:
                # 10058: the bucket exists with another config (e.g. more history). Same config is no error.
                if err.err_code != STREAM_NAME_IN_USE:
                    raise
                self._kv = await self._js.key_value(self.bucket)
        else:
            self._kv = await self._js.key_value(self.bucket)

    async def _on_error(self, err: Exception) -> None:
        """Keep connection errors for debugging instead of nats-py's default traceback per reconnect try."""
        self.errors.append(err)
        del self.errors[:-50]

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def wait_connected(self, timeout: float = 10.0) -> None:
        """Block until the client has (re)connected, e.g. after the server restarted."""
        deadline = time.monotonic() + timeout
        while not self.connected:
            if time.monotonic() > deadline:
                raise TimeoutError(f"not connected to {self.url} within {timeout} s: {self.errors[-3:]}")
            time.sleep(0.05)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run `coro` on the client's loop; TimeoutError after `timeout` (default: the client's)."""
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    @property
    def kv(self) -> KeyValue:
        if self._kv is None:
            raise RuntimeError("KvClient is closed")
        return self._kv

    def subscribe(self, subject: str) -> list[bytes]:
        """Every message on subject from now on, appended as it comes (read the list from the test)."""
        got: list[bytes] = []

        async def on(msg: Any) -> None:
            got.append(msg.data)

        async def sub() -> None:
            assert self._nc is not None
            await self._nc.subscribe(subject, cb=on)
            await self._nc.flush()

        self._run(sub())
        return got

    def put(self, key: str, value: bytes | str | dict[str, Any]) -> int:
        """Store `value` (dicts as JSON); returns the new KV revision."""
        if isinstance(value, dict):
            value = json.dumps(value)
        if isinstance(value, str):
            value = value.encode()
        return self._run(self.kv.put(key, value))

    def delete(self, key: str) -> None:
        self._run(self.kv.delete(key))

    def purge(self, key: str) -> None:
        self._run(self.kv.purge(key))

    def recreate(self) -> None:
        """Delete the bucket and make it anew, empty: its revisions start from 1 again."""

        async def again() -> None:
            assert self._js is not None
            await self._js.delete_key_value(self.bucket)
            self._kv = await self._js.create_key_value(bucket=self.bucket, history=1)

        self._run(again())

    def get(self, key: str) -> tuple[bytes | None, int] | None:
        """(value, revision) of the key, or None when it is missing, deleted or purged."""

        async def fetch() -> tuple[bytes | None, int] | None:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                return None
            return entry.value, int(entry.revision or 0)

        return self._run(fetch())

    def close(self) -> None:
        """Close the connection and stop the loop thread; safe to call twice."""
        nc, self._nc, self._kv, self._js = self._nc, None, None, None
        if nc is not None and self._loop.is_running():
            with contextlib.suppress(TimeoutError, nats.errors.Error, OSError):
                self._run(nc.close(), timeout=5)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive() and not self._loop.is_closed():
            self._loop.close()

    def __enter__(self) -> KvClient:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


__all__ = ["NATS_SERVER", "KvClient", "NatsServer", "free_port"]
