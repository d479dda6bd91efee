"""A DNS server whose behaviour per record type a test chooses: answer, drop (the client times out) or refuse.

dnsmasq cannot drop one record type while it answers another, which is what broken authoritative servers and
middleboxes do to AAAA queries. This server is a UDP socket made in a world's namespace and served by a thread
of the test process: a few lines, and every query it gets is counted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from types import TracebackType

import dns.exception
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

from netns_fixtures.dns import call_in_netns

BEHAVIOURS = ("answer", "drop", "refuse")


class ScriptedDnsServer:
    """UDP port 53 at ``address`` in namespace ``ns``. ``records`` maps names to addresses; ``behaviour``
    maps a record type ("A", "AAAA") to what it does (default "answer": the name's addresses of that family,
    NODATA when it has none, NXDOMAIN for an unknown name)."""

    def __init__(
        self,
        ns: str,
        address: str,
        records: Mapping[str, Iterable[str]],
        behaviour: Mapping[str, str] | None = None,
        ttl: int = 1,
    ) -> None:
        self.behaviour = dict(behaviour or {})
        if bad := [b for b in self.behaviour.values() if b not in BEHAVIOURS]:
            raise ValueError(f"behaviour must be one of {BEHAVIOURS}, not {bad}")
        self.records = {
            n.rstrip(".").lower(): [str(ipaddress.ip_address(a)) for a in v] for n, v in records.items()
        }
        self.ns, self.address, self.ttl = ns, address, ttl
        self.queries: Counter[tuple[str, str]] = Counter()  # (name, type) -> queries received
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ScriptedDnsServer:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET

        def bind() -> socket.socket:
            sock = socket.socket(family, socket.SOCK_DGRAM)
            sock.bind((self.address, 53))
            return sock

        self._sock = call_in_netns(self.ns, bind)
        self._thread = threading.Thread(target=self._serve, name=f"scripted-dns-{self.address}", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recvfrom
            self._sock.close()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def _serve(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, peer = self._sock.recvfrom(4096)
            except OSError:
                return
            if not data:
                return  # shut down
            reply = self._reply(data)
            if reply is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendto(reply, peer)

    def _reply(self, data: bytes) -> bytes | None:
        try:
            query = dns.message.from_wire(data)
            question = query.question[0]
        except (dns.exception.DNSException, IndexError):
            return None
        name = question.name.to_text().rstrip(".").lower()
        rdtype = dns.rdatatype.to_text(question.rdtype)
        self.queries[name, rdtype] += 1
        what = self.behaviour.get(rdtype, "answer")
        if what == "drop":
            return None
        response = dns.message.make_response(query)
        if what == "refuse":
            response.set_rcode(dns.rcode.REFUSED)
        elif name not in self.records:
            response.set_rcode(dns.rcode.NXDOMAIN)
        else:
            version = 6 if rdtype == "AAAA" else 4
            addrs = [a for a in self.records[name] if ipaddress.ip_address(a).version == version]
            if addrs and rdtype in ("A", "AAAA"):
                response.answer.append(dns.rrset.from_text_list(question.name, self.ttl, "IN", rdtype, addrs))
        return response.to_wire()
