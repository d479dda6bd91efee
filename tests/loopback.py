"""Loopback helpers shared by the tests and the NATS harness: a free port, and a scrape of /metrics."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A port nobody listens on right now on 127.0.0.1, so servers of different tests run side by side."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int, netns: str | None = None) -> dict[tuple[str, tuple], float]:
    """Every sample the agent serves at 127.0.0.1:PORT/metrics, by (name, sorted labels); netns: the named
    namespace the agent runs in, when not this one."""
    url = f"http://127.0.0.1:{port}/metrics"
    if netns is None:
        body = urllib.request.urlopen(url, timeout=5).read().decode()
    else:
        fetch = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())"
        argv = ["ip", "netns", "exec", netns, sys.executable, "-c", fetch, url]
        body = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=20).stdout
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body)
        for s in fam.samples
    }
