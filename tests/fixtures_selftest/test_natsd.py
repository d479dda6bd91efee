"""Self-test of tests.natsd: a real nats-server with JetStream, and the synchronous KV client over it.

No root needed: everything runs on 127.0.0.1. Skipped when nats-server is not installed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import nats.errors
import pytest

from tests.natsd import NATS_SERVER, KvClient, NatsServer

pytestmark = pytest.mark.skipif(
    not os.access(NATS_SERVER, os.X_OK), reason="needs nats-server (apt-get install nats-server)"
)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """A started server that is always stopped, whatever the test does to it."""
    srv = NatsServer(tmp_path / "nats")
    try:
        yield srv.start()
    finally:
        srv.stop()


def retry_put(kv: KvClient, key: str, value: dict[str, object], timeout: float = 10.0) -> int:
    """Put until the client has reconnected; the server may have just come back."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return kv.put(key, value)
        except (TimeoutError, nats.errors.Error):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_put_get_delete(server: NatsServer) -> None:
    assert server.running()
    assert server.url == f"nats://127.0.0.1:{server.port}"
    with KvClient(server.url, timeout=5) as kv:
        r1 = kv.put("sb-1", {"id": "sb-1", "netns": "ns1"})
        got = kv.get("sb-1")
        assert got is not None
        assert json.loads(got[0] or b"") == {"id": "sb-1", "netns": "ns1"}
        assert got[1] == r1
        r2 = kv.put("sb-1", "plain")
        assert r2 > r1
        assert kv.get("sb-1") == (b"plain", r2)
        kv.delete("sb-1")
        assert kv.get("sb-1") is None
        assert kv.get("never-written") is None
        r3 = kv.put("sb-2", b"x")
        kv.purge("sb-2")
        assert r3 > r2
        assert kv.get("sb-2") is None
        # Creating the bucket again (same config) is not an error; opening it without create works too.
        with (
            KvClient(server.url, timeout=5) as again,
            KvClient(server.url, create=False, timeout=5) as opened,
        ):
            assert again.get("sb-1") is None
            assert opened.put("sb-3", {"n": 3}) > r3


def test_restart_keeps_store_and_client_reconnects(server: NatsServer) -> None:
    port = server.port
    with KvClient(server.url, timeout=3) as kv:
        r1 = kv.put("sb-1", {"v": 1})
        server.stop()
        assert not server.running()
        server.stop()  # idempotent
        # Once the client has noticed, a put fails at once instead of being buffered for later.
        deadline = time.monotonic() + 5
        while kv.connected and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises((TimeoutError, nats.errors.Error)):
            kv.put("sb-lost", {"v": 0})  # raises, bounded, rather than hanging
        server.start()
        assert server.port == port
        r2 = retry_put(kv, "sb-2", {"v": 2})
        assert r2 > r1
        assert kv.get("sb-1") == (json.dumps({"v": 1}).encode(), r1)
        # No buffered publish from the failed put lands after the reconnect.
        assert kv.get("sb-lost") is None
        # A crash (SIGKILL) loses nothing acknowledged either: JetStream file storage.
        server.kill()
        server.start()
        kv.wait_connected(10)
        assert retry_put(kv, "sb-3", {"v": 3}) > r2
        assert kv.get("sb-2") == (json.dumps({"v": 2}).encode(), r2)
    # A fresh client sees the same bucket without creating it.
    with KvClient(server.url, create=False, timeout=5) as fresh:
        assert fresh.get("sb-1") == (json.dumps({"v": 1}).encode(), r1)


def test_start_fails_clearly_when_port_taken(server: NatsServer, tmp_path: Path) -> None:
    second = NatsServer(tmp_path / "second", port=server.port)
    started = time.monotonic()
    try:
        with pytest.raises(RuntimeError, match="address already in use"):
            second.start(timeout=5)
        assert time.monotonic() - started < 6
        assert not second.running()
    finally:
        second.stop()
    assert server.running()  # the first one is untouched
