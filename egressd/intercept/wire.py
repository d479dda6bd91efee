"""The proxy's fast path: plain A/AAAA/CNAME traffic read and written as bytes, without dnspython.

dnspython builds objects for every record: about 0.26 ms of Python per 1-address answer and 1.9 ms per
40-address one, most of what the proxy added to a query. Nearly every query a sandbox sends is the plain
case: one question, class IN, at most an EDNS record without options; an answer of A, AAAA and CNAME
records. That case is read and written here, with the same semantics as messages.py (the slow path):
the same question upstream, the same CNAME chain and addresses, the same reply (the sandbox's id, RD
copied, RA set, capped TTLs, only the chain's records, no address inside guard.deny, the SOA of a negative
answer, our own EDNS record when the sandbox sent one). Anything else, or anything odd, raises WireError,
and the caller hands the message to messages.py: this module decides nothing alone. tests/unit/test_wire.py
holds the two paths to the same output and feeds this one malformed bytes.

Every read is bounds-checked; compression pointers must point backwards (no loops) and names stay within
255 bytes.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

import dns.rdatatype

from egressd.model.entries import IPNetwork, within

HEADER = struct.Struct("!HHHHHH")  # id, flags, question, answer, authority, additional counts
RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, data length
QR, OPCODE, TC, RD, RA, CD = 0x8000, 0x7800, 0x0200, 0x0100, 0x0080, 0x0010
T_A, T_CNAME, T_SOA, T_AAAA, T_OPT = 1, 5, 6, 28, 41
C_IN = 1
UPSTREAM_PAYLOAD = 1232  # EDNS payload asked of upstreams and offered to sandboxes (the DNS flag day size)
MAX_CHAIN = 16  # names on a CNAME chain that are followed
# A label the proxy will judge: letters, digits, hyphens, underscores (SRV, DMARC). Anything else (a dot or
# a byte inside a label) could make a name's text look like another name's: refused, never forwarded.
LABEL = re.compile(rb"^[A-Za-z0-9_-]{1,63}$")
Labels = tuple[bytes, ...]


class WireError(ValueError):
    """Not for the fast path: the slow path (dnspython) reads the message."""


def read_name(buf: bytes, off: int) -> tuple[Labels, int]:
    """The labels of the name at off (as sent), and the offset after it where it is written."""
    labels: list[bytes] = []
    end, size, start = -1, 1, off
    while True:
        if off >= len(buf):
            raise WireError("a name runs past the end")
        n = buf[off]
        if n == 0:
            return tuple(labels), (off + 1 if end < 0 else end)
        if n & 0xC0 == 0xC0:
            if off + 1 >= len(buf):
                raise WireError("a compression pointer runs past the end")
            target = ((n & 0x3F) << 8) | buf[off + 1]
            if target >= start:  # backwards only: no loops
                raise WireError("a compression pointer that does not point back")
            end = off + 2 if end < 0 else end
            off = start = target
            continue
        if n & 0xC0:
            raise WireError("an unknown label type")
        size += n + 1
        if size > 255 or off + 1 + n > len(buf):
            raise WireError("a name too long or past the end")
        labels.append(buf[off + 1 : off + 1 + n])
        off += 1 + n


def lower(labels: Labels) -> Labels:
    return tuple(label.lower() for label in labels)


def text(labels: Labels) -> str:
    return b".".join(labels).decode("ascii", "replace").lower()


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
class Rrset:
    """Records of one owner and type in an answer, in their order, without duplicates (as dnspython)."""

    owner: Labels  # as sent
    rdtype: int
    ttl: int  # the smallest of its records'
    items: list[object] = field(default_factory=list)  # bytes (A, AAAA), Labels (CNAME), SOA tuples


@dataclass
class FastAnswer:
    rcode: int
    answer: dict[tuple[Labels, int], Rrset]  # by (lower-case owner, type), in order
    soa: list[Rrset]  # of the authority section
    keys: list[Labels]  # the CNAME chain, lower case, the question first
    chain: list[str]  # the same as text (as messages.Learned)
    addresses: dict[str, float]  # address -> TTL (as messages.Learned)


def _rdata(buf: bytes, kind: int, off: int, length: int) -> object:
    end = off + length
    if kind in (T_A, T_AAAA):
        if length != (4 if kind == T_A else 16):
            raise WireError("an address of the wrong length")
        return buf[off:end]
    if kind == T_CNAME:
        target, after = read_name(buf, off)
        if after != end:
            raise WireError("a CNAME that does not fill its record")
        return target
    mname, after = read_name(buf, off)  # SOA
    rname, after = read_name(buf, after)
    if after + 20 != end:
        raise WireError("a SOA of the wrong length")
    return (mname, rname, buf[after:end])


def _records(buf: bytes, off: int, count: int, keep: tuple[int, ...]) -> tuple[list[tuple], int]:
    """(owner, type, TTL, data) of the next count records whose type is in keep; WireError for a record
    of another class or, in the answer section (keep has CNAME), of another type."""
    out = []
    for _ in range(count):
        owner, off = read_name(buf, off)
        if off + RR_FIXED.size > len(buf):
            raise WireError("a record past the end")
        kind, rdclass, ttl, length = RR_FIXED.unpack_from(buf, off)
        off += RR_FIXED.size
        if off + length > len(buf):
            raise WireError("record data past the end")
        if kind == T_OPT:
            if ttl >> 24:
                raise WireError("an extended rcode")
        elif rdclass != C_IN:
            raise WireError("a record of another class")
        elif kind in keep:
            out.append((owner, kind, ttl, _rdata(buf, kind, off, length)))
        elif T_CNAME in keep:
            raise WireError("an answer record of another type")
        off += length
    return out, off


def _grouped(records: Iterable[tuple]) -> dict[tuple[Labels, int], Rrset]:
    out: dict[tuple[Labels, int], Rrset] = {}
    for owner, kind, ttl, item in records:
        rrset = out.setdefault((lower(owner), kind), Rrset(owner, kind, ttl))
        rrset.ttl = min(rrset.ttl, ttl)
        if item not in rrset.items:
            rrset.items.append(item)
    return out


def read_answer(query: FastQuery, wire: bytes) -> FastAnswer:
    """The upstream's answer to query (its id and question already matched: upstream.py)."""
    if len(wire) < HEADER.size + len(query.question):
        raise WireError("short answer")
    _, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    if qd != 1:
        raise WireError("not one question")
    off = HEADER.size + len(query.question)
    answer, off = _records(wire, off, an, (T_A, T_AAAA, T_CNAME))
    authority, off = _records(wire, off, ns, (T_SOA,))
    _, off = _records(wire, off, ar, ())
    if off != len(wire):
        raise WireError("trailing bytes")
    rrsets = _grouped(answer)
    chain, ttl = [lower(query.labels)], float("inf")
    while (chain[-1], T_CNAME) in rrsets and len(chain) < MAX_CHAIN:
        cname = rrsets[(chain[-1], T_CNAME)]
        ttl = min(ttl, cname.ttl)
        chain.append(lower(cname.items[0]))  # type: ignore[arg-type]
    on_chain = set(chain)
    addresses: dict[str, float] = {}
    for (owner, kind), rrset in rrsets.items():
        if kind != T_CNAME and owner in on_chain:
            for raw in rrset.items:
                addr = _address(raw)  # type: ignore[arg-type]
                addresses[addr] = max(addresses.get(addr, 0.0), float(min(ttl, rrset.ttl)))
    soa = list(_grouped(authority).values())
    return FastAnswer(flags & 0xF, rrsets, soa, chain, [text(c) for c in chain], addresses)


def _address(raw: bytes) -> str:
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return str(ipaddress.IPv6Address(raw))


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
            items = [raw for raw in items if not within(_address(raw), nets)]  # type: ignore[arg-type]
        w.rrset(rrset, min(rrset.ttl, cap), items)
        an += len(items)
    for rrset in answer.soa:
        w.rrset(rrset, min(rrset.ttl, cap), rrset.items)
        ns += len(rrset.items)
    opt = _opt(UPSTREAM_PAYLOAD) if query.edns else b""
    if HEADER.size + len(w.buf) + len(opt) > max(512, min(max_size, 65535)):
        return _header(query, TC | answer.rcode, 0, 0) + query.question + opt
    return _header(query, answer.rcode, an, ns) + bytes(w.buf) + opt
