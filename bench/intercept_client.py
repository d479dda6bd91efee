"""bench.intercept's measuring pieces: the timing client run inside a sandbox, and the commit watcher.

Both only observe: the client sends the bench's own queries to the server it is told (an address of the test
world), the watcher reads nftables commit notifications in one namespace and writes nothing.
"""

from __future__ import annotations

import contextlib
import errno
import json
import select
import subprocess
import sys
import threading
import time
from typing import Any

from bench.agent import _commit_socket, _has_newgen
from bench.apply import Deadline
from netns_fixtures import call_in_netns

# The timing client, one long-lived process per sandbox (`ip netns exec SANDBOX python -c CLIENT`): each
# stdin line is a batch {"server", "name", "count", "gap_ms", "timeout"}, answered by one stdout line, a
# JSON list with one entry per query. Each query gets a new UDP socket (a new flow, as a stub resolver
# does), connected to the server; the clock runs from just before send() to the reply with the query's id
# (time.monotonic_ns: CLOCK_MONOTONIC, the same clock as the bench's commit watcher). The reply is parsed
# after the clock stops. The gap is slept before each query, outside the clock.
CLIENT = r"""
import json, os, socket, sys, time
import dns.flags, dns.message, dns.rdatatype

payload = int(sys.argv[1])
wires = {}
for line in sys.stdin:
    cmd = json.loads(line)
    key = cmd["name"]
    if key not in wires:
        wires[key] = dns.message.make_query(key, "A", use_edns=0, payload=payload).to_wire()
    base, out = wires[key], []
    for _ in range(cmd["count"]):
        time.sleep(cmd["gap_ms"] / 1000)
        wire = os.urandom(2) + base[2:]
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.settimeout(cmd["timeout"])
        try:
            s.connect((cmd["server"], 53))
            t0 = time.monotonic_ns()
            s.send(wire)
            data = s.recv(65535)
            while data[:2] != wire[:2]:
                data = s.recv(65535)
            t1 = time.monotonic_ns()
        except OSError as e:
            out.append({"error": type(e).__name__})
            continue
        finally:
            s.close()
        r = dns.message.from_wire(data)
        found = [rd.address for rr in r.answer if rr.rdtype == dns.rdatatype.A for rd in rr]
        out.append({"t0": t0, "t1": t1, "rcode": r.rcode(), "tc": bool(r.flags & dns.flags.TC), "a": found})
    print(json.dumps(out), flush=True)
"""


class Client:
    """The timing client in one sandbox, fed one batch at a time; `payload`: the EDNS payload it offers."""

    def __init__(self, ns: str, payload: int) -> None:
        self.ns = ns
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-c", CLIENT, str(payload)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def batch(
        self, server: str, name: str, count: int, gap_ms: float, timeout: float, deadline: Deadline
    ) -> list[dict[str, Any]]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        cmd = {"server": server, "name": name, "count": count, "gap_ms": gap_ms, "timeout": timeout}
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        bound = min(deadline.end - time.monotonic(), 30.0 + count * (timeout + gap_ms / 1000))
        ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, bound))
        if not ready:
            deadline.check(f"a batch in {self.ns}")
            raise TimeoutError(f"the client in {self.ns} did not answer a batch of {count} in {bound:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise RuntimeError(f"the client in {self.ns} exited ({self.proc.poll()}): {err[-2000:]}")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()  # its loop ends
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class CommitWatcher:
    """The time of every nftables commit in one namespace (NFT_MSG_NEWGEN on a netlink socket made there).
    Nothing else is read, so a commit costs this process a wake-up and no libnftables call. A transaction
    that changes nothing (adding an element the set already holds) commits nothing and is not seen."""

    def __init__(self, ns: str) -> None:
        self.times: list[int] = []
        self.overflows = 0
        self.error: str | None = None
        self._sock = call_in_netns(ns, _commit_socket)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.overflows += 1
                    continue
                if not self._stop.is_set():
                    self.error = str(e)
                return
            t = time.monotonic_ns()
            if _has_newgen(data):
                self.times.append(t)

    def close(self) -> None:
        if self._stop.is_set():
            return  # closed already
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
