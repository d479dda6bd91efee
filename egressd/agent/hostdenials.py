"""Denials at the host-side tables (docs/denials.md, `host_interface`): what the guard table drops.

A host-side table runs at its interface's ingress hook, before conntrack, so it only marks what it denies;
the guard table (kernel/hostside.py) drops marked packets that are not replies, and logs each to the denials'
NFLOG group in the agent's own namespace (prefix "host", at most `rate` a second per interface). One socket
here hears them all, read by the event loop. The packet's input interface names the sandbox (its record's
host_interface); the step and the entry are the reference decision's (ruleset/decide.py, which the
differential tests check against the kernel) for that sandbox's policy and the address: the guard cannot
know which step of the host-side table marked the packet.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time

from egressd.agent.denials import ATTRIBUTION_BUDGET, Budget, DenialBook
from egressd.common.logs import log
from egressd.desired.dnscache import DnsCache
from egressd.kernel.nflog import LoggedPacket, is_log_datagram, open_log_socket, parse_packets
from egressd.kernel.nfnl import NetlinkError
from egressd.model.sandbox import Policy
from egressd.reconcile.reconciler import Reconciler
from egressd.ruleset.decide import decide
from egressd.ruleset.render import EMBEDDED_IPV4

RECV_BUFFER = 1 << 16
DATAGRAMS_PER_WAKE = 64


class HostDenials:
    """The guard table's log, made events of the sandboxes whose interfaces the packets came in on."""

    def __init__(self, book: DenialBook, reconciler: Reconciler, cache: DnsCache, group: int) -> None:
        self._book = book
        self._reconciler = reconciler
        self._cache = cache
        self._group = group
        self._sock: socket.socket | None = None
        self._buffer = bytearray(RECV_BUFFER)
        self._budget = Budget(ATTRIBUTION_BUDGET)

    def start(self) -> bool:
        """Listen, from the event loop; False (logged) when the group cannot be had: no host-side denials."""
        try:
            self._sock = open_log_socket(self._group)
        except (OSError, NetlinkError) as e:
            log(
                logging.WARNING,
                "denial_log_unavailable",
                netns="host",
                group=self._group,
                error=str(e),
                detail="denials at the host-side tables are not reported; enforcement is unchanged",
            )
            return False
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._readable)
        return True

    def close(self) -> None:
        if self._sock is not None:
            asyncio.get_running_loop().remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None

    def _readable(self) -> None:
        sock, buf = self._sock, self._buffer
        for _ in range(DATAGRAMS_PER_WAKE if sock is not None else 0):
            try:
                n, (sender, _) = sock.recvfrom_into(buf, len(buf), socket.MSG_TRUNC)  # type: ignore[union-attr]
            except BlockingIOError:
                return
            except OSError:  # ENOBUFS: log messages lost, nothing else to do
                self._book.dropped["agent"] += 1
                continue
            if n > len(buf):
                self._book.dropped["malformed"] += 1
                continue
            view = memoryview(buf)[:n]
            if sender != 0 or not is_log_datagram(view):
                continue  # only the kernel's log messages
            packets, malformed = parse_packets(view)
            self._book.dropped["malformed"] += malformed
            for p in packets:
                self._one(p)

    def _one(self, p: LoggedPacket) -> None:
        if p.prefix != "host" or p.indev is None:
            self._book.dropped["foreign"] += 1
            return
        try:
            iface: str | None = socket.if_indextoname(p.indev)
        except OSError:
            iface = None
        sid = self._reconciler.store.naming_interface(iface) if iface is not None else None
        d = self._reconciler.desired.get(sid) if sid is not None else None
        if sid is None or d is None:
            self._book.dropped["unknown"] += 1  # the interface is gone, or no longer a sandbox's
            return
        if not self._budget.allows():  # a flood of distinct drops: reported without step and entry
            self._book.host_packet(sid, p, "host", None, None)
            return
        t0 = time.perf_counter()
        self._attribute(sid, d.policy, p)
        self._budget.spend(time.perf_counter() - t0)

    def _attribute(self, sid: str, policy: Policy, p: LoggedPacket) -> None:
        """The step, entry and host of a drop, by the reference decision for the sandbox's policy."""
        proxy = self._reconciler.proxy

        def learned(address: str) -> list[str]:
            seen = proxy.learned(sid, address)
            return seen[0] if seen is not None else []

        v = decide(policy, self._reconciler.config, p.dst, self._cache.holding, learned)
        if v.action == "deny":
            self._book.host_packet(sid, p, v.step, v.entry, v.via or (v.entry if v.host else None))
            return
        # Denied by what decide() does not judge: DNS around interception, or an IPv4-mapped destination
        # (a socket sends it as IPv4; on the wire it only ever goes around the IPv4 rules).
        mapped = p.family == 6 and ipaddress.ip_address(p.dst) in EMBEDDED_IPV4[0]
        step = "embedded-ipv4" if mapped else "dns" if p.dport == 53 else "host"
        self._book.host_packet(sid, p, step, str(EMBEDDED_IPV4[0]) if mapped else None, None)


async def run_denials(book: DenialBook, reconciler: Reconciler, cache: DnsCache, group: int) -> None:
    """The agent's denial task: the host-side guard's log heard, the book's windows closed, until
    cancelled (then the windows still open are published: a stop loses no event already seen)."""
    host = HostDenials(book, reconciler, cache, group)
    host.start()
    try:
        await book.run()
    finally:
        host.close()
        book.flush(everything=True)
