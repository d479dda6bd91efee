"""DNS messages read as bytes: the plain case (one question, class IN; A, AAAA and CNAME answers, a SOA in
the authority section), without dnspython. Shared by the DNS proxy (intercept/wire.py) and the agent's own
resolver (desired/query.py); both hand anything else to dnspython.

dnspython builds objects for every record: most of what a busy resolver or proxy spends per message. Here
a message is read once into Rrsets keyed by lower-case owner and type. Anything unusual raises WireError,
and the caller lets dnspython read the message: this module decides nothing alone.

Every read is bounds-checked; compression pointers must point backwards (no loops) and names stay within
255 bytes.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

HEADER = struct.Struct("!HHHHHH")  # id, flags, question, answer, authority, additional counts
RR_FIXED = struct.Struct("!HHIH")  # type, class, TTL, data length
QR, OPCODE, TC, RD, RA, CD = 0x8000, 0x7800, 0x0200, 0x0100, 0x0080, 0x0010
T_A, T_NS, T_CNAME, T_SOA, T_AAAA, T_OPT = 1, 2, 5, 6, 28, 41
CHECKED = (T_A, T_NS, T_CNAME, T_SOA, T_AAAA)  # the types read (and checked) outside the answer section
C_IN = 1
NOERROR, SERVFAIL, NXDOMAIN, REFUSED = 0, 2, 3, 5
MAX_CHAIN = 16  # names on a CNAME chain that are followed
MAX_POINTERS = 16  # compression pointers in one name (dnspython's limit)
Labels = tuple[bytes, ...]


class WireError(ValueError):
    """Not for the fast path: the slow path (dnspython) reads the message."""


def read_name(buf: bytes, off: int) -> tuple[Labels, int]:
    """The labels of the name at off (as sent), and the offset after it where it is written. As dnspython
    reads names: a compression pointer points back, to a name that ends before the part that points to
    it, 16 pointers at most."""
    labels: list[bytes] = []
    end, size, start, limit, hops = -1, 1, off, len(buf), 0
    while True:
        if off >= limit:
            raise WireError("a name runs past the end")
        n = buf[off]
        if n == 0:
            return tuple(labels), (off + 1 if end < 0 else end)
        if n & 0xC0 == 0xC0:
            if off + 1 >= limit:
                raise WireError("a compression pointer runs past the end")
            target = ((n & 0x3F) << 8) | buf[off + 1]
            hops += 1
            if target >= start or hops > MAX_POINTERS:  # backwards only: no loops
                raise WireError("a compression pointer that does not point back, or too many")
            end = off + 2 if end < 0 else end
            limit, start, off = start, target, target  # what it points to ends before this part of the name
            continue
        if n & 0xC0:
            raise WireError("an unknown label type")
        size += n + 1
        if size > 255 or off + 1 + n > limit:
            raise WireError("a name too long or past the end")
        labels.append(buf[off + 1 : off + 1 + n])
        off += 1 + n


def lower(labels: Labels) -> Labels:
    return tuple(label.lower() for label in labels)


def text(labels: Labels) -> str:
    return b".".join(labels).decode("ascii", "replace").lower()


def address_text(raw: bytes) -> str:
    """An A or AAAA record's data as text (IPv6 compressed, as ipaddress writes it)."""
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw)
    return str(ipaddress.IPv6Address(raw))


@dataclass
class Rrset:
    """Records of one owner and type in a section, in their order, without duplicates (as dnspython)."""

    owner: Labels  # as sent
    rdtype: int
    ttl: int  # the smallest of its records'
    items: list[object] = field(default_factory=list)  # bytes (A, AAAA), Labels (CNAME), SOA tuples


Rrsets = dict[tuple[Labels, int], Rrset]  # by (lower-case owner, type), in order


@dataclass
class Response:
    """A plain response: its flags (the rcode in the low 4 bits), the answer and authority sections."""

    flags: int
    answer: Rrsets
    authority: Rrsets

    @property
    def rcode(self) -> int:
        return self.flags & 0xF


def _rdata(buf: bytes, kind: int, off: int, length: int) -> object:
    end = off + length
    if kind in (T_A, T_AAAA):
        if length != (4 if kind == T_A else 16):
            raise WireError("an address of the wrong length")
        return buf[off:end]
    if kind in (T_CNAME, T_NS):
        target, after = read_name(buf, off)
        if after != end:
            raise WireError("a CNAME or NS that does not fill its record")
        return target
    mname, after = read_name(buf, off)  # SOA
    rname, after = read_name(buf, after)
    if after + 20 != end:
        raise WireError("a SOA of the wrong length")
    return (mname, rname, buf[after:end])


def _records(
    buf: bytes, off: int, count: int, allowed: tuple[int, ...], keep: tuple[int, ...] = ()
) -> tuple[list[tuple], int]:
    """(owner, type, TTL, data) of the next count records whose type is in keep. Every record's data is
    checked as dnspython would read it: a record of another class or of a type not allowed, or an EDNS
    record with options or out of place (allowed empty: the additional section, once, owned by the root)
    raises WireError."""
    out = []
    opt = False
    for _ in range(count):
        owner, off = read_name(buf, off)
        if off + RR_FIXED.size > len(buf):
            raise WireError("a record past the end")
        kind, rdclass, ttl, length = RR_FIXED.unpack_from(buf, off)
        off += RR_FIXED.size
        if off + length > len(buf):
            raise WireError("record data past the end")
        if kind == T_OPT:
            if ttl >> 24 or length or allowed or opt or owner:
                raise WireError("an extended rcode, EDNS options, or an EDNS record out of place")
            opt = True
        elif rdclass != C_IN or kind not in (allowed or CHECKED):
            raise WireError("a record of another class or type")
        else:
            item = _rdata(buf, kind, off, length)
            if kind in keep:
                ttl = (
                    0 if ttl > 0x7FFFFFFF else ttl
                )  # RFC 2181: a TTL with the high bit set is 0 (as dnspython)
                out.append((owner, kind, ttl, item))
        off += length
    return out, off


def _grouped(records: Iterable[tuple]) -> Rrsets:
    out: Rrsets = {}
    for owner, kind, ttl, item in records:
        rrset = out.setdefault((lower(owner), kind), Rrset(owner, kind, ttl))
        rrset.ttl = min(rrset.ttl, ttl)
        if item not in rrset.items:
            if rrset.items and kind in (T_CNAME, T_SOA):
                raise WireError("a second CNAME or SOA for one name")  # dnspython keeps the last one
            rrset.items.append(item)
    return out


def read_response(wire: bytes, question_size: int) -> Response:
    """A response whose id and question were matched already (common/dnsupstream.py), question_size the
    length of that question section: its answer (A, AAAA, CNAME only) and authority (SOA kept; NS, A, AAAA
    and CNAME checked and passed over) sections grouped into Rrsets; in the additional section those types
    and a bare EDNS record."""
    if len(wire) < HEADER.size + question_size:
        raise WireError("short answer")
    _, flags, qd, an, ns, ar = HEADER.unpack_from(wire)
    if qd != 1:
        raise WireError("not one question")
    off = HEADER.size + question_size
    answer, off = _records(wire, off, an, (T_A, T_AAAA, T_CNAME), (T_A, T_AAAA, T_CNAME))
    authority, off = _records(wire, off, ns, CHECKED, (T_SOA,))
    _, off = _records(wire, off, ar, ())
    if off != len(wire):
        raise WireError("trailing bytes")
    return Response(flags, _grouped(answer), _grouped(authority))


def cname_chain(rrsets: Rrsets, start: Labels) -> tuple[list[Labels], float]:
    """The names from start along the CNAME records (lower case, start first, at most MAX_CHAIN), and the
    shortest TTL of the CNAME records followed (inf when none)."""
    chain, ttl = [start], float("inf")
    while (chain[-1], T_CNAME) in rrsets and len(chain) < MAX_CHAIN:
        cname = rrsets[(chain[-1], T_CNAME)]
        ttl = min(ttl, cname.ttl)
        chain.append(lower(cname.items[0]))  # type: ignore[arg-type]
    return chain, ttl


def stub_answer(
    wire: bytes, question_size: int, qname: Labels, qtype: int
) -> tuple[int, tuple[str, ...], float]:
    """What a stub resolver takes from a NOERROR or NXDOMAIN response to (qname, qtype), read as dnspython's
    resolver reads it: (rcode, the qtype addresses of the name the CNAME chain ends at, the shortest TTL
    along the chain and of those addresses). WireError for anything but the plain case: another rcode, a
    chain that loops, runs long or has addresses midway, addresses beside NXDOMAIN."""
    response = read_response(wire, question_size)
    if response.rcode not in (NOERROR, NXDOMAIN):
        raise WireError("an rcode the fast path does not read")
    rrsets = response.answer
    chain, ttl = cname_chain(rrsets, lower(qname))
    if len(chain) >= MAX_CHAIN or len(set(chain)) != len(chain):
        raise WireError("a CNAME chain that loops or runs long")
    if any((name, qtype) in rrsets for name in chain[:-1]):
        raise WireError("a CNAME chain with addresses midway")
    final = rrsets.get((chain[-1], qtype))
    if final is None:
        return response.rcode, (), ttl
    if response.rcode == NXDOMAIN:
        raise WireError("addresses beside NXDOMAIN")
    return response.rcode, tuple(address_text(raw) for raw in final.items), min(ttl, final.ttl)  # type: ignore[arg-type]
