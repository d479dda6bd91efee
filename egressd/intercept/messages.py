"""DNS messages as the proxy sees them, with dnspython: the sandbox's query checked and read, the query it
sends upstream rebuilt from the question alone, the upstream answer read (the CNAME chain, the addresses on
it), and the reply the sandbox gets (its own id, capped TTLs, no address inside guard.deny). Pure: no
sockets here. The slow path: wire.py serves the plain case with the same semantics, and hands anything
else here.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

import dns.edns
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset

from egressd.common.dnswire import MAX_CHAIN
from egressd.intercept.wire import LABEL, UPSTREAM_PAYLOAD
from egressd.model.entries import IPNetwork, within

ADDRESS_TYPES = (dns.rdatatype.A, dns.rdatatype.AAAA)


class QueryError(ValueError):
    """Not a query the proxy answers; `reply` is what the sandbox gets instead (None: nothing at all)."""

    def __init__(self, reason: str, reply: dns.message.Message | None = None) -> None:
        super().__init__(reason)
        self.reply = reply


@dataclass(frozen=True)
class Query:
    message: dns.message.Message
    name: str  # lower case, no trailing dot
    rdtype: str  # "A", "AAAA", "TXT", ...

    @property
    def payload(self) -> int:
        """The largest UDP reply the client takes."""
        return max(512, self.message.payload) if self.message.edns >= 0 else 512


@dataclass(frozen=True)
class Learned:
    """What an upstream answer says: the names its CNAME chain passes through (the question first) and
    the A/AAAA addresses on that chain, each with the shortest TTL that led to it."""

    chain: list[str]
    addresses: dict[str, float]  # address -> TTL in seconds


def parse_query(wire: bytes) -> Query:
    try:
        msg = dns.message.from_wire(wire)
    except dns.exception.DNSException as e:
        raise QueryError(f"not a DNS message: {e}") from None
    if msg.flags & dns.flags.QR:
        raise QueryError("a response, not a query")
    if msg.opcode() != dns.opcode.QUERY or len(msg.question) != 1:
        raise QueryError("only standard queries with one question are answered", reply(msg, dns.rcode.NOTIMP))
    question = msg.question[0]
    if question.rdclass != dns.rdataclass.IN:
        raise QueryError("only class IN is answered", reply(msg, dns.rcode.REFUSED))
    labels = question.name.labels[:-1]  # the root label is empty
    if not labels or not all(LABEL.match(label) for label in labels):
        raise QueryError("a name with unusual bytes in a label", reply(msg, dns.rcode.REFUSED))
    name = b".".join(labels).decode("ascii").lower()
    return Query(msg, name, dns.rdatatype.to_text(question.rdtype))


def reply(query: dns.message.Message, rcode: int) -> dns.message.Message:
    """An empty reply with rcode (REFUSED, NXDOMAIN, SERVFAIL), the query's id and question."""
    out = dns.message.make_response(query, our_payload=UPSTREAM_PAYLOAD)
    # RA: the proxy recurses for the sandbox. glibc takes an empty answer without RA (a truncated one
    # included) for a referral, and gives up on it instead of asking again over TCP.
    out.flags |= dns.flags.RA
    out.set_rcode(rcode)
    return out


def upstream_query(query: Query) -> dns.message.Message:
    """The question alone, under a new id: nothing else of the sandbox's message (EDNS options, flags
    beyond RD) leaves the host."""
    q = query.message.question[0]
    out = dns.message.make_query(q.name, q.rdtype, use_edns=0, payload=UPSTREAM_PAYLOAD)
    out.flags = dns.flags.RD | (query.message.flags & dns.flags.CD)
    return out


def learned(query: Query, answer: dns.message.Message) -> Learned:
    """Follow the CNAME chain from the question; addresses only from records owned by names on it."""
    qname = query.message.question[0].name
    chain = [qname]
    ttl = float("inf")
    by_owner = {rrset.name: rrset for rrset in answer.answer if rrset.rdtype == dns.rdatatype.CNAME}
    while chain[-1] in by_owner and len(chain) < MAX_CHAIN:
        rrset = by_owner[chain[-1]]
        ttl = min(ttl, rrset.ttl)
        chain.append(rrset[0].target)
    on_chain = set(chain)
    addresses: dict[str, float] = {}
    for rrset in answer.answer:
        if rrset.rdtype in ADDRESS_TYPES and rrset.name in on_chain:
            for rdata in rrset:
                addr = str(ipaddress.ip_address(rdata.address))
                addresses[addr] = max(addresses.get(addr, 0.0), float(min(ttl, rrset.ttl)))
    names = [n.to_text(omit_final_dot=True).lower() for n in chain]
    return Learned(names, addresses)


def sandbox_reply(
    query: Query, answer: dns.message.Message, chain: Learned, max_ttl: float, blocked: Iterable[IPNetwork]
) -> dns.message.Message:
    """The upstream's answer under the sandbox's id: the records of the question's CNAME chain only, TTLs
    capped at max_ttl (the sandbox never caches an address longer than it may use it), no A/AAAA record
    inside blocked (DNS rebinding to the metadata address), the SOA of a negative answer, and nothing of the
    upstream's EDNS."""
    out = reply(query.message, answer.rcode())
    cap = int(max_ttl)
    nets = tuple(blocked)
    on_chain = {dns.name.from_text(n) for n in chain.chain}
    for rrset in answer.answer:
        if rrset.name in on_chain:
            _copy(rrset, cap, nets, out.answer)
    for rrset in answer.authority:
        if rrset.rdtype == dns.rdatatype.SOA:
            _copy(rrset, cap, nets, out.authority)
    return out


def _copy(
    rrset: dns.rrset.RRset, cap: int, nets: tuple[IPNetwork, ...], target: list[dns.rrset.RRset]
) -> None:
    kept = [r for r in rrset if not _blocked(rrset.rdtype, r, nets)]
    if kept:
        target.append(dns.rrset.from_rdata_list(rrset.name, min(rrset.ttl, cap), kept))


def _blocked(rdtype: int, rdata: object, nets: tuple[IPNetwork, ...]) -> bool:
    if rdtype not in ADDRESS_TYPES:
        return False
    return within(str(rdata.address), nets)  # type: ignore[attr-defined]


def read_answer(query: Query, wire: bytes) -> tuple[dns.message.Message, Learned]:
    """An upstream's answer (bytes already matched to the question), and what it says. DNSException when
    it does not parse."""
    answer = dns.message.from_wire(wire)
    return answer, learned(query, answer)


def to_wire(message: dns.message.Message, max_size: int = 65535) -> bytes:
    """The reply as bytes; one that does not fit max_size (a UDP client's payload) goes out empty with TC
    set, so the client asks again over TCP."""
    return message.to_wire(max_size=max_size, prefer_truncation=True)
