"""The upstream of bench.intercept_scale, a PoolDnsServer in a process of its own.

Why a process: PoolDnsServer serves from a thread of whoever starts it, and the load generator of
bench.intercept_scale is a Python loop too. In one process they would share one interpreter lock, and the
upstream's answers would wait for the generator's turn (and the reverse): a latency that belongs to neither.

Two things differ from a plain PoolDnsServer, both to make the kernel writes of the intercepted path
predictable (docs: the proxy writes an answer's addresses to the sandbox's learned sets only when that
makes their time in the kernel grow by more than a second):

- the TTL counts down, as a caching resolver's does: every record of every answer expires at one instant,
  so an address the sandbox already learned is not written again however often it is asked (a fixed TTL
  would make every answer more than a second after the last one for that address a write);
- `FRESH_NAME`, asked for AAAA, gets an address never handed out before (2001:db8:f::/64, counting up):
  every answer is a write.

Run by `Upstream` (below), which talks to it over stdin/stdout: "counts" answers with the queries received
per name (JSON), "reset" sets them to zero; end of input stops it.
"""

from __future__ import annotations

import ipaddress
import json
import select
import subprocess
import sys
import time
from collections.abc import Mapping
from typing import IO, Any

import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset

from netns_fixtures._nsutil import PACKAGE_PARENT, close_helper, set_parent_death_signal
from netns_fixtures.pool_dns import PoolDnsServer, ZoneEntry

FRESH_NAME = "fresh.bench.test"
FRESH_BASE = int(ipaddress.IPv6Address("2001:db8:f::"))
READY_TIMEOUT_S = 10.0
ANSWER_TIMEOUT_S = 10.0


class CountdownServer(PoolDnsServer):
    """A PoolDnsServer whose TTL counts down from the value given, and whose FRESH_NAME AAAA is always new."""

    _expires: float = 0.0
    _fresh: int = 0

    @property  # type: ignore[override]
    def ttl(self) -> int:
        return max(1, int(self._expires - time.monotonic()))

    @ttl.setter
    def ttl(self, value: int) -> None:
        self._expires = time.monotonic() + value

    def _answer(self, qname: dns.name.Name, rdtype: int) -> tuple[int, list[dns.rrset.RRset], list[str]]:
        if rdtype != dns.rdatatype.AAAA or qname.to_text(omit_final_dot=True).lower() != FRESH_NAME:
            return super()._answer(qname, rdtype)
        self._fresh += 1  # the lock is held (PoolDnsServer._reply)
        addr = str(ipaddress.IPv6Address(FRESH_BASE + self._fresh))
        return dns.rcode.NOERROR, [dns.rrset.from_text_list(qname, self.ttl, "IN", "AAAA", [addr])], [addr]


def serve(ns: str, address: str, zones: Mapping[str, ZoneEntry], ttl: int) -> None:
    names = [*zones, FRESH_NAME]
    with CountdownServer(ns, address, zones, ttl=ttl, seed=1) as server:
        print("ready", flush=True)
        for line in sys.stdin:
            if line.strip() == "reset":
                server.reset_counts()
                print("{}", flush=True)
            else:
                counts = {n: server.query_count(n) for n in names}
                print(json.dumps({"queries": counts, "fresh_given": server._fresh}), flush=True)


def readline_within(stream: IO[str], timeout: float) -> str:
    """A line of a child's output, stripped, or "" if none comes in time. poll, not select: this process
    holds thousands of sockets, and select() refuses descriptors of 1024 or more."""
    poller = select.poll()
    poller.register(stream, select.POLLIN)
    return stream.readline().strip() if poller.poll(timeout * 1000) else ""


class Upstream:
    """The server's process, seen from the bench: started, asked, stopped (also by the bench's death)."""

    def __init__(self, ns: str, address: str, zones: Mapping[str, ZoneEntry], ttl: int) -> None:
        zones = {FRESH_NAME: ["2001:db8:f::"], **zones}  # its A: NODATA; its AAAA: see CountdownServer
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.intercept_scale_upstream",
                ns,
                address,
                json.dumps(zones),
                str(ttl),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=PACKAGE_PARENT,
            preexec_fn=set_parent_death_signal,
        )
        if self._line(READY_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError(f"the upstream at {address} in {ns} did not start")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        return readline_within(self.proc.stdout, timeout)

    def ask(self, cmd: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self._line(ANSWER_TIMEOUT_S)
        if not line:
            raise RuntimeError(f"the upstream did not answer {cmd!r} (exit status {self.proc.poll()})")
        return json.loads(line)

    def close(self) -> None:
        close_helper(self.proc)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
