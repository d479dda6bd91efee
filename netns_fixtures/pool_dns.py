"""A DNS upstream that answers like a CDN: each A/AAAA query gets one address picked at random from a pool.

Made for tests of clients that must cope with answers that change from one query to the next, CNAME chains,
answers too big for UDP (TC bit, retry over TCP), and for tests that prove a query never reached the upstream
(every query is counted by name, type and transport). Like ``scripted_dns``, the sockets (UDP and TCP port 53)
are made in a world's namespace and served by one daemon thread of the test process; nothing is forwarded.

``zones`` maps a name (any case, trailing dot or not) to one of:

- a pool, ``["192.0.2.1", "2001:db8::1", ...]`` (or ``{"pool": [...]}``, or one address as a string): an A
  or AAAA query gets ONE address of that family, picked at random for each query; NODATA if it has none;
- ``{"many": [...]}`` (or ``{"pool": [...], "many": True}``): the answer holds ALL its addresses of the
  family;
- ``{"cname": "other.name"}``: the answer is the CNAME record, then whatever the target answers (chains of any
  length are followed within the one answer, as a recursive resolver does; a loop is SERVFAIL; a chain that
  ends at an unknown name is NXDOMAIN with the CNAMEs, per RFC 6604).

A TXT query for a known name gets one TXT record ``"ok"`` (after the CNAMEs, if any); any other type
NODATA; an unknown name NXDOMAIN. A UDP answer larger than the client's payload size (512 without EDNS, else
the EDNS payload, never less than 512) is sent with the TC bit and no records; over TCP the whole answer is
sent.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import random
import selectors
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from netns_fixtures._nsutil import CommandError, netns_path, run
from netns_fixtures.dns import call_in_netns

ZoneEntry = str | Iterable[str] | Mapping[str, object]

PORT = 53
UDP_MIN_PAYLOAD = 512  # RFC 1035: without EDNS, and the floor for any EDNS payload a client announces
TCP_MAX_CONNECTIONS = 32  # more are accepted and closed at once
TCP_IDLE_SECONDS = 10.0  # a client connection silent this long is closed
TCP_SEND_TIMEOUT = 2.0
JOIN_TIMEOUT = 2.0


@dataclass(frozen=True)
class _Entry:
    kind: str  # "pool", "many" or "cname"
    addresses: tuple[str, ...] = ()
    target: str = ""


@dataclass
class _Conn:
    sock: socket.socket
    buf: bytes = b""
    last: float = 0.0


def _canon(name: str) -> str:
    canon = name.strip().rstrip(".").lower()
    if not canon:
        raise ValueError(f"{name!r} is not a name")
    dns.name.from_text(canon)  # raises on labels too long and the like
    return canon


def _addresses(name: str, values: object) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    if not isinstance(values, Iterable):
        raise ValueError(f"{name}: addresses must be a list, not {values!r}")
    out: list[str] = []
    for text in values:
        addr = str(ipaddress.ip_address(str(text)))
        if addr not in out:
            out.append(addr)
    return tuple(out)


def _entry(name: str, value: ZoneEntry) -> _Entry:
    if not isinstance(value, Mapping):
        return _Entry("pool", _addresses(name, value))
    keys = set(value)
    if keys == {"cname"}:
        target = value["cname"]
        if not isinstance(target, str):
            raise ValueError(f"{name}: cname must be a name, not {target!r}")
        return _Entry("cname", target=_canon(target))
    if keys == {"many"}:
        return _Entry("many", _addresses(name, value["many"]))
    if keys in ({"pool"}, {"pool", "many"}):
        return _Entry("many" if value.get("many") else "pool", _addresses(name, value["pool"]))
    raise ValueError(
        f"{name}: expected a list of addresses, {{'pool': [...]}}, {{'many': [...]}} or {{'cname': ...}}"
    )


class PoolDnsServer:
    """UDP and TCP port 53 at ``address`` (IPv4 or IPv6) in namespace ``ns``, answering from ``zones`` (see
    the module docstring) with ``ttl`` on every record. ``seed`` makes the random picks repeatable.

    Counters (updated under ``lock`` before the reply is sent, so a count read right after a reply is exact):
    ``queries[(name, type, transport)]`` (name lower-case without trailing dot, type such as "A", transport
    "udp" or "tcp"), ``answered[(name, address)]`` (addresses actually handed out, under the name that was
    asked, so a CNAME alias's answers count under the alias; a truncated UDP answer hands out nothing),
    ``names_seen()``. ``set()`` and ``remove()`` change the zones while it runs.
    """

    def __init__(
        self, ns: str, address: str, zones: Mapping[str, ZoneEntry], ttl: int = 30, *, seed: int | None = None
    ) -> None:
        self.ns = ns
        self.address = str(ipaddress.ip_address(address))
        self.family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        self.ttl = ttl
        self.lock = threading.Lock()
        self.queries: Counter[tuple[str, str, str]] = Counter()  # (name, type, transport) -> received
        self.answered: Counter[tuple[str, str]] = Counter()  # (name asked, address) -> times handed out
        self.truncated = 0  # UDP answers sent with TC because they did not fit
        self._zones = {_canon(n): _entry(n, v) for n, v in zones.items()}
        self._random = random.Random(seed)
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._added_address = False
        self._closed = False

    # ------------------------------------------------------------------------------ public
    def names_seen(self) -> set[str]:
        """Every name ever asked (any type, either transport), lower-case, no trailing dot."""
        with self.lock:
            return {name for name, _, _ in self.queries}

    def query_count(
        self, name: str | None = None, qtype: str | None = None, transport: str | None = None
    ) -> int:
        """Queries received that match every argument given (None matches anything)."""
        want = _canon(name) if name is not None else None
        with self.lock:
            return sum(
                n
                for (qn, qt, tr), n in self.queries.items()
                if (want is None or qn == want)
                and (qtype is None or qt == qtype.upper())
                and (transport is None or tr == transport)
            )

    def reset_counts(self) -> None:
        with self.lock:
            self.queries.clear()
            self.answered.clear()
            self.truncated = 0

    def set(self, name: str, value: ZoneEntry) -> None:
        """Add or replace one name's entry (same forms as in ``zones``); served from the next query on."""
        entry = _entry(name, value)
        with self.lock:
            self._zones[_canon(name)] = entry

    def remove(self, name: str) -> None:
        """Forget a name: it is NXDOMAIN from the next query on."""
        with self.lock:
            self._zones.pop(_canon(name), None)

    # ------------------------------------------------------------------------------ lifecycle
    def __enter__(self) -> PoolDnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> PoolDnsServer:
        if self._thread is not None or self._closed:
            raise RuntimeError("PoolDnsServer can be started once")
        try:
            try:
                self._udp, self._tcp = call_in_netns(self.ns, self._bind)
            except OSError as exc:
                if exc.errno != errno.EADDRNOTAVAIL or self.family != socket.AF_INET6:
                    raise
                # IPv6 cannot bind or send from an address only covered by an AnyIP route: put it on lo.
                self._add_address()
                self._udp, self._tcp = call_in_netns(self.ns, self._bind)
            self._wake_r, self._wake_w = os.pipe()
            self._thread = threading.Thread(target=self._serve, name=f"pool-dns-{self.address}", daemon=True)
            self._thread.start()
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Stop the thread (joined with a timeout), close every socket, undo the lo address (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=JOIN_TIMEOUT)
        for sock in (self._udp, self._tcp):
            if sock is not None:
                sock.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._udp = self._tcp = None
        self._wake_r = self._wake_w = -1
        self._remove_address()

    def _bind(self) -> tuple[socket.socket, socket.socket]:
        udp = socket.socket(self.family, socket.SOCK_DGRAM)
        tcp = socket.socket(self.family, socket.SOCK_STREAM)
        try:
            udp.bind((self.address, PORT))
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            tcp.bind((self.address, PORT))
            tcp.listen(16)
        except OSError:
            udp.close()
            tcp.close()
            raise
        udp.setblocking(False)
        tcp.setblocking(False)
        return udp, tcp

    def _add_address(self) -> None:
        proc = run(
            ["ip", "-n", self.ns, "addr", "add", f"{self.address}/128", "dev", "lo", "nodad"], check=False
        )
        if proc.returncode == 0:
            self._added_address = True
        elif "File exists" not in proc.stderr:
            raise CommandError(proc.args, proc.returncode, proc.stderr)

    def _remove_address(self) -> None:
        if not self._added_address:
            return
        self._added_address = False
        if os.path.exists(netns_path(self.ns)):  # the world may already be gone, address and all
            run(["ip", "-n", self.ns, "addr", "del", f"{self.address}/128", "dev", "lo"], check=False)

    # ------------------------------------------------------------------------------ serving
    def _serve(self) -> None:
        assert self._udp is not None and self._tcp is not None
        conns: dict[int, _Conn] = {}
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._wake_r, selectors.EVENT_READ, "wake")
            sel.register(self._udp, selectors.EVENT_READ, "udp")
            sel.register(self._tcp, selectors.EVENT_READ, "tcp")
            while True:
                events = sel.select(timeout=1.0 if conns else None)
                for key, _ in events:
                    if key.data == "wake":
                        return
                    if key.data == "udp":
                        self._on_udp()
                    elif key.data == "tcp":
                        self._on_accept(sel, conns)
                    else:
                        self._on_tcp_data(sel, conns, key.fd)
                now = time.monotonic()
                for fd in [fd for fd, c in conns.items() if now - c.last > TCP_IDLE_SECONDS]:
                    self._drop(sel, conns, fd)
        except (OSError, ValueError):
            return  # sockets closed under us (close() gave up waiting)
        finally:
            for fd in list(conns):
                self._drop(sel, conns, fd)
            sel.close()

    def _on_udp(self) -> None:
        assert self._udp is not None
        try:
            data, peer = self._udp.recvfrom(65535)
        except (BlockingIOError, InterruptedError, ConnectionError):
            return
        reply = self._reply(data, "udp")
        if reply is not None:
            with contextlib.suppress(OSError):
                self._udp.sendto(reply, peer)

    def _on_accept(self, sel: selectors.BaseSelector, conns: dict[int, _Conn]) -> None:
        assert self._tcp is not None
        try:
            sock, _ = self._tcp.accept()
        except (BlockingIOError, InterruptedError, ConnectionError):
            return  # nothing to accept, or the client gave up (ECONNABORTED)
        if len(conns) >= TCP_MAX_CONNECTIONS:
            sock.close()
            return
        sock.settimeout(TCP_SEND_TIMEOUT)  # reads only follow readiness; bounds sendall
        conns[sock.fileno()] = _Conn(sock, last=time.monotonic())
        sel.register(sock, selectors.EVENT_READ, "conn")

    def _on_tcp_data(self, sel: selectors.BaseSelector, conns: dict[int, _Conn], fd: int) -> None:
        conn = conns[fd]
        try:
            chunk = conn.sock.recv(65537)
        except OSError:
            chunk = b""
        if not chunk:
            self._drop(sel, conns, fd)
            return
        conn.buf += chunk
        conn.last = time.monotonic()
        while len(conn.buf) >= 2:
            (size,) = struct.unpack("!H", conn.buf[:2])
            if len(conn.buf) < 2 + size:
                return
            message, conn.buf = conn.buf[2 : 2 + size], conn.buf[2 + size :]
            reply = self._reply(message, "tcp")
            if reply is None:
                self._drop(sel, conns, fd)
                return
            try:
                conn.sock.sendall(struct.pack("!H", len(reply)) + reply)
            except OSError:
                self._drop(sel, conns, fd)
                return

    @staticmethod
    def _drop(sel: selectors.BaseSelector, conns: dict[int, _Conn], fd: int) -> None:
        conn = conns.pop(fd)
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(conn.sock)
        conn.sock.close()

    # ------------------------------------------------------------------------------ answers
    def _reply(self, data: bytes, transport: str) -> bytes | None:
        """The wire reply to one query, or None for something that is not a DNS query (ignored)."""
        try:
            query = dns.message.from_wire(data)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        response = dns.message.make_response(query, recursion_available=True)
        if query.opcode() != dns.opcode.QUERY:
            response.set_rcode(dns.rcode.NOTIMP)
            return response.to_wire()
        if len(query.question) != 1:
            response.set_rcode(dns.rcode.FORMERR)
            return response.to_wire()
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True).lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self.lock:
            self.queries[name, rdtype, transport] += 1
            if question.rdclass != dns.rdataclass.IN:
                rcode, rrsets, handed = dns.rcode.REFUSED, [], []
            else:
                rcode, rrsets, handed = self._answer(question.name, question.rdtype)
        response.set_rcode(rcode)
        response.answer.extend(rrsets)
        limit = 65535
        if transport == "udp":
            limit = max(UDP_MIN_PAYLOAD, query.payload) if query.edns >= 0 else UDP_MIN_PAYLOAD
        try:
            wire = response.to_wire(max_size=limit)
        except dns.exception.TooBig:
            response.answer.clear()
            if transport == "tcp":
                response.set_rcode(dns.rcode.SERVFAIL)  # over 64 KiB: cannot be sent at all
                return response.to_wire()
            response.flags |= dns.flags.TC
            with self.lock:
                self.truncated += 1
            return response.to_wire()
        with self.lock:
            self.answered.update((name, addr) for addr in handed)
        return wire

    def _answer(self, qname: dns.name.Name, rdtype: int) -> tuple[int, list[dns.rrset.RRset], list[str]]:
        """(rcode, answer rrsets, addresses handed out); called with the lock held."""
        rrsets: list[dns.rrset.RRset] = []
        owner, key, seen = qname, qname.to_text(omit_final_dot=True).lower(), set()
        while True:
            entry = self._zones.get(key)
            if entry is None:
                return dns.rcode.NXDOMAIN, rrsets, []
            if entry.kind == "cname":
                if key in seen:
                    return dns.rcode.SERVFAIL, [], []
                seen.add(key)
                target = dns.name.from_text(entry.target)
                rrsets.append(dns.rrset.from_text(owner, self.ttl, "IN", "CNAME", target.to_text()))
                if rdtype == dns.rdatatype.CNAME:
                    return dns.rcode.NOERROR, rrsets, []
                owner, key = target, entry.target
                continue
            if rdtype == dns.rdatatype.TXT:
                rrsets.append(dns.rrset.from_text(owner, self.ttl, "IN", "TXT", '"ok"'))
                return dns.rcode.NOERROR, rrsets, []
            if rdtype not in (dns.rdatatype.A, dns.rdatatype.AAAA):
                return dns.rcode.NOERROR, rrsets, []
            version = 6 if rdtype == dns.rdatatype.AAAA else 4
            family = [a for a in entry.addresses if ipaddress.ip_address(a).version == version]
            if family and entry.kind == "pool":
                family = [self._random.choice(family)]
            if family:
                text = dns.rdatatype.to_text(rdtype)
                rrsets.append(dns.rrset.from_text_list(owner, self.ttl, "IN", text, family))
            return dns.rcode.NOERROR, rrsets, family
