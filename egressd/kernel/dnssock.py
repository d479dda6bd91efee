"""The DNS proxy's sockets, made inside a sandbox's namespace and served from the agent's event loop.

A socket stays in the namespace it was made in (and keeps that namespace alive: close it when the sandbox
goes). A short visit by the calling thread (netns.in_netns) makes them: UDP and TCP, IPv4 and IPv6, on the
proxy port of every address, and the netlink socket that writes the answers' addresses to its learned sets,
all at descriptors of 1024 and more (common/fds.py, move_high: libnftables needs the low ones).
The sandbox's table redirects its queries there (127.0.0.1 / ::1 for its own processes, the incoming
interface's address for traffic routed through it) and lets no other packet reach the port. A UDP reply must
leave from the address the query was redirected to, or conntrack cannot map it back to the server the
sandbox asked: the UDP sockets read each query's destination (IP_PKTINFO) and send the reply from it."""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

from egressd.common.fds import move_high
from egressd.kernel.netns import NsId, in_netns
from egressd.kernel.nfnl import netfilter_socket
from egressd.kernel.nfnl_elements import ElementSocket

TCP_BACKLOG = 64
# Linux's values; Python's socket module names IP_PKTINFO only from 3.12 (Debian 12 has 3.11).
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
IPV6_RECVPKTINFO = getattr(socket, "IPV6_RECVPKTINFO", 49)
IPV6_PKTINFO = getattr(socket, "IPV6_PKTINFO", 50)
_IN_PKTINFO = struct.Struct("@I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("@16sI")  # addr, ifindex


@dataclass
class ProxySockets:
    udp: list[socket.socket]
    tcp: list[socket.socket]
    ident: NsId  # the namespace they were made in
    # the answers' addresses go to the kernel over this one; None: through the backend (tests)
    elements: ElementSocket | None = None

    def close(self) -> None:
        """The listeners. The element socket is closed by its owner, off the event loop: closing it soon
        after a write waits an RCU grace period (see nfnl_elements.py)."""
        for s in (*self.udp, *self.tcp):
            with contextlib.suppress(OSError):
                s.close()


def _udp(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVPKTINFO, 1)
        else:
            s.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    except OSError:
        s.close()
        raise
    return s


def _tcp(family: int, port: int) -> socket.socket:
    s = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
        s.listen(TCP_BACKLOG)
    except OSError:
        s.close()
        raise
    return s


def open_proxy_sockets(path: str, port: int) -> ProxySockets:
    """UDP and TCP sockets on `port` of every address in the namespace at path. IPv6 is skipped where the
    namespace has none (the kernel then has no IPv6 to intercept either). Raises NetnsError for a path
    that cannot be used, OSError when a socket cannot be made (the port is taken: the sandbox stays
    pending with that error)."""

    def make() -> ProxySockets:
        made: list[socket.socket] = []
        try:
            udp, tcp = [], []
            for family in (socket.AF_INET, socket.AF_INET6):
                try:
                    u = move_high(_udp(family, port))
                except OSError as e:
                    if family == socket.AF_INET6 and e.errno in (97, 99):  # EAFNOSUPPORT, EADDRNOTAVAIL
                        continue
                    raise
                made.append(u)
                udp.append(u)
                t = move_high(_tcp(family, port))
                made.append(t)
                tcp.append(t)
            elements = ElementSocket(move_high(netfilter_socket()), path)
            return ProxySockets(udp, tcp, NsId(0, 0), elements)
        except OSError:
            for s in made:
                s.close()
            raise

    sockets, ident = in_netns(path, make)
    sockets.ident = ident
    return sockets


def recv_queries(sock: socket.socket, limit: int) -> Iterator[tuple[bytes, tuple, str]]:
    """Up to limit datagrams waiting on a proxy UDP socket: (data, the sender, the address it was sent to)."""
    size = socket.CMSG_SPACE(_IN6_PKTINFO.size)
    for _ in range(limit):
        try:
            data, ancillary, _flags, sender = sock.recvmsg(65535, size)
        except (BlockingIOError, InterruptedError):
            return
        local = None
        for level, kind, cdata in ancillary:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                local = socket.inet_ntop(socket.AF_INET, _IN_PKTINFO.unpack(cdata[: _IN_PKTINFO.size])[2])
            elif level == socket.IPPROTO_IPV6 and kind == IPV6_PKTINFO:
                local = socket.inet_ntop(socket.AF_INET6, _IN6_PKTINFO.unpack(cdata[: _IN6_PKTINFO.size])[0])
        if local is not None:
            yield data, sender, local


def send_reply(sock: socket.socket, data: bytes, sender: tuple, local: str) -> None:
    """The reply, from the address the query was sent to. A full socket buffer drops it (the client asks
    again), as a busy DNS server would."""
    if sock.family == socket.AF_INET6:
        info = _IN6_PKTINFO.pack(socket.inet_pton(socket.AF_INET6, local), 0)
        cmsg = [(socket.IPPROTO_IPV6, IPV6_PKTINFO, info)]
    else:
        info = _IN_PKTINFO.pack(0, socket.inet_pton(socket.AF_INET, local), b"\0" * 4)
        cmsg = [(socket.IPPROTO_IP, IP_PKTINFO, info)]
    with contextlib.suppress(BlockingIOError, InterruptedError, ConnectionRefusedError):
        sock.sendmsg([data], cmsg, 0, sender)
