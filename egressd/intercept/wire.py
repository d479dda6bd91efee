"""The proxy's fast path: plain A/AAAA/CNAME traffic read and written as bytes, without dnspython.

dnspython builds objects for every record: about 0.26 ms of Python per 1-address answer and 1.9 ms per
40-address one, most of what the proxy added to a query. Nearly every query a sandbox sends is the plain
case: one question, class IN, at most an EDNS record without options; an answer of A, AAAA and CNAME
records. That case is read and written here, with the same semantics as messages.py (the slow path):
the same question upstream, the same CNAME chain and addresses, the same reply (the sandbox's id, RD
copied, RA set, capped TTLs, only the chain's records, no address inside guard.deny, the SOA of a negative
answer, our own EDNS record when the sandbox sent one). Anything else, or anything odd, raises WireError,
and the caller hands the message to messages.py: this module decides nothing alone. tests/unit/test_wire.py
holds the two paths to the same output and feeds this one malformed bytes. The reading of DNS messages as
bytes is common/dnswire.py, shared with the agent's own resolver.
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Iterable
from dataclasses import dataclass

import dns.rdatatype

from egressd.common.dnswire import (
    C_IN,
    CD,
    HEADER,
    OPCODE,
    QR,
    RA,
    RD,
    RR_FIXED,
    T_CNAME,
    T_OPT,
    TC,
    Labels,
    Rrset,
    Rrsets,
    WireError,
    address_text,
    cname_chain,
    lower,
    read_name,
    read_response,
    text,
)
from egressd.model.entries import IPNetwork, within

UPSTREAM_PAYLOAD = 1232  # EDNS payload asked of upstreams and offered to sandboxes (the DNS flag day size)
# A label the proxy will judge: letters, digits, hyphens, underscores (SRV, DMARC). Anything else (a dot or
# a byte inside a label) could make a name's text look like another name's: refused, never forwarded.
LABEL = re.compile(rb"^[A-Za-z0-9_-]{1,63}$")


@dataclass(frozen=True)
class FastQuery:
    """A plain query of the sandbox: what the reply and the upstream question are built from."""

    id: int
    flags: int
    labels: Labels  # the question's name, as sent
    question: bytes  # the question section, as sent
    rdtype: str
    edns: bool
    udp_payload: int
    name: str  # lower case, no trailing dot

    @property
    def payload(self) -> int:
        """The largest UDP reply the client takes."""
        return max(512, self.udp_payload) if self.edns else 512


def parse_query(wire: bytes) -> FastQuery:
    """A query with one IN question of plain labels, nothing else but an EDNS record without options."""
    if len(wire) < HEADER.size:
        raise WireError("short header")
    qid, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    if flags & (QR | OPCODE) or qd != 1 or an or ns or ar > 1:
        raise WireError("not a plain query")
    labels, off = read_name(wire, HEADER.size)
    if not labels or off != HEADER.size + sum(len(label) + 1 for label in labels) + 1:
        raise WireError("an empty or compressed question")
    if not all(LABEL.match(label) for label in labels) or off + 4 > len(wire):
        raise WireError("unusual bytes in a label, or no type and class")
    rdtype, rdclass = struct.unpack_from("!HH", wire, off)
    off += 4
    question = wire[HEADER.size : off]
    payload = 0
    if ar:
        if wire[off : off + 1] != b"\0" or off + 1 + RR_FIXED.size > len(wire):
            raise WireError("an additional record that is not a bare EDNS record")
        kind, payload, _, length = RR_FIXED.unpack_from(wire, off + 1)
        if kind != T_OPT or length:
            raise WireError("an additional record that is not a bare EDNS record")
        off += 1 + RR_FIXED.size
    if rdclass != C_IN or off != len(wire):
        raise WireError("another class, or trailing bytes")
    name = text(labels)
    return FastQuery(qid, flags, labels, question, dns.rdatatype.to_text(rdtype), bool(ar), payload, name)


def _opt(payload: int) -> bytes:
    return b"\0" + RR_FIXED.pack(T_OPT, payload, 0, 0)


def upstream_question(query: FastQuery) -> bytes:
    """The question alone under a new id, RD and the sandbox's CD, our EDNS record: nothing else of the
    sandbox's message leaves the host."""
    flags = RD | (query.flags & CD)
    return HEADER.pack(secrets.randbits(16), flags, 1, 0, 0, 1) + query.question + _opt(UPSTREAM_PAYLOAD)


def refusal(query: FastQuery, rcode: int) -> bytes:
    """An empty reply with rcode, the query's id and question."""
    return _header(query, rcode, 0, 0) + query.question + (_opt(UPSTREAM_PAYLOAD) if query.edns else b"")


def _header(query: FastQuery, flags: int, an: int, ns: int) -> bytes:
    return HEADER.pack(query.id, QR | (query.flags & RD) | RA | flags, 1, an, ns, int(query.edns))


@dataclass
class FastAnswer:
    rcode: int
    answer: Rrsets  # by (lower-case owner, type), in order
    soa: list[Rrset]  # of the authority section
    keys: list[Labels]  # the CNAME chain, lower case, the question first
    chain: list[str]  # the same as text (as messages.Learned)
    addresses: dict[str, float]  # address -> TTL (as messages.Learned)


def read_answer(query: FastQuery, wire: bytes) -> FastAnswer:
    """The upstream's answer to query (its id and question already matched: common/dnsupstream.py)."""
    response = read_response(wire, len(query.question))
    rrsets = response.answer
    keys, ttl = cname_chain(rrsets, lower(query.labels))
    on_chain = set(keys)
    addresses: dict[str, float] = {}
    for (owner, kind), rrset in rrsets.items():
        if kind != T_CNAME and owner in on_chain:
            for raw in rrset.items:
                addr = address_text(raw)  # type: ignore[arg-type]
                addresses[addr] = max(addresses.get(addr, 0.0), float(min(ttl, rrset.ttl)))
    soa = list(response.authority.values())
    return FastAnswer(response.rcode, rrsets, soa, keys, [text(c) for c in keys], addresses)


class _Writer:
    """A message body after the header, with names compressed against what was written before."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self._at: dict[Labels, int] = {}

    def name(self, labels: Labels) -> None:
        for i in range(len(labels)):
            key = lower(labels[i:])
            at = self._at.get(key)
            if at is not None:
                self.buf += struct.pack("!H", 0xC000 | at)
                return
            if HEADER.size + len(self.buf) < 0x4000:
                self._at[key] = HEADER.size + len(self.buf)
            self.buf += bytes([len(labels[i])]) + labels[i]
        self.buf += b"\0"

    def rrset(self, rrset: Rrset, ttl: int, items: list[object]) -> None:
        for item in items:
            self.name(rrset.owner)
            head = len(self.buf)
            self.buf += RR_FIXED.pack(rrset.rdtype, C_IN, ttl, 0)
            if isinstance(item, bytes):
                self.buf += item
            elif rrset.rdtype == T_CNAME:
                self.name(item)  # type: ignore[arg-type]
            else:
                mname, rname, tail = item  # type: ignore[misc]
                self.name(mname)
                self.name(rname)
                self.buf += tail
            struct.pack_into("!H", self.buf, head + RR_FIXED.size - 2, len(self.buf) - head - RR_FIXED.size)


def reply(
    query: FastQuery, answer: FastAnswer, max_ttl: float, blocked: Iterable[IPNetwork], max_size: int
) -> bytes:
    """What the sandbox gets (as messages.sandbox_reply); too big for max_size: empty, with TC set, so the
    client asks again over TCP."""
    nets, cap, on_chain = tuple(blocked), int(max_ttl), set(answer.keys)
    w = _Writer()
    w.name(query.labels)
    w.buf += query.question[-4:]
    an = ns = 0
    for (owner, kind), rrset in answer.answer.items():
        if owner not in on_chain:
            continue
        items = rrset.items
        if kind != T_CNAME and nets:
            items = [raw for raw in items if not within(address_text(raw), nets)]  # type: ignore[arg-type]
        w.rrset(rrset, min(rrset.ttl, cap), items)
        an += len(items)
    for rrset in answer.soa:
        w.rrset(rrset, min(rrset.ttl, cap), rrset.items)
        ns += len(rrset.items)
    opt = _opt(UPSTREAM_PAYLOAD) if query.edns else b""
    if HEADER.size + len(w.buf) + len(opt) > max(512, min(max_size, 65535)):
        return _header(query, TC | answer.rcode, 0, 0) + query.question + opt
    return _header(query, answer.rcode, an, ns) + bytes(w.buf) + opt
