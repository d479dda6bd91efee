"""One record type of one name asked of the nameservers: the agent's own queries, thousands a second.

The lean path (`WireLookup`): per (name, type) the query's wire form is built once and kept (each question
only gets a new id), sent on a fresh non-blocking UDP socket connected to the nameserver and served by the
loop's sock_* calls (common/dnsupstream.py: a datagram that is not the answer to this question is ignored;
TCP when the answer is truncated), and a plain answer (A or AAAA records, a CNAME chain, NXDOMAIN, NOERROR
with no data) is read as bytes (common/dnswire.py). Anything else in an answer (another record type, a
chain that loops or forks, an extended rcode, bytes that do not parse) is read by dnspython, from the same
bytes and the way its resolver reads them, so the fast reader never decides alone: it answers the plain
case or raises WireError.

`DnspythonLookup` is dnspython's resolver as the agent used it before: the baseline of `python -m bench.dns`
(EGRESSD_RESOLVER=dnspython in the agent's environment), and the reference of tests/unit/test_query.py.

Both: a REFUSED or SERVFAIL (any rcode but NOERROR and NXDOMAIN), an unreadable answer or a silent
nameserver makes the next configured one be asked; each gets its share of the timeout. Nothing is cached
but the questions' bytes: the DNS cache (dnscache.py) is the one that counts.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Sequence

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

from egressd.common.dnsupstream import DNS_PORT, NoAnswer, Unusable, ask_each
from egressd.common.dnswire import HEADER, NOERROR, NXDOMAIN, Labels, WireError, read_name, stub_answer
from egressd.desired.dnscache import NXDOMAIN as NXDOMAIN_TEXT
from egressd.desired.dnscache import Answer

ENGINE_ENV = "EGRESSD_RESOLVER"  # "dnspython": the old path, for the benchmark's baseline
MAX_KEPT_QUERIES = 1 << 16  # questions' bytes kept; more (names come and go) and the store starts over


class WireLookup:
    """The lean path: cached questions, plain sockets, answers read as bytes (dnspython for the rest)."""

    def __init__(self, servers: Sequence[str], timeout: float, port: int = DNS_PORT) -> None:
        self.servers = list(servers)
        self.timeout = timeout
        self.port = port
        self._queries: dict[tuple[str, str], tuple[bytes, Labels, int]] = {}

    def question(self, name: str, rdtype: str) -> tuple[bytes, Labels, int]:
        """The query for (name, type) as dnspython's resolver sends it (RD, no EDNS), id 0; its name's
        labels and its type. Raises dns.exception.DNSException for a name DNS cannot carry."""
        kept = self._queries.get((name, rdtype))
        if kept is None:
            if len(self._queries) >= MAX_KEPT_QUERIES:
                self._queries.clear()
            message = dns.message.make_query(name + ".", rdtype, id=0)
            wire = message.to_wire()
            kept = (wire, read_name(wire, HEADER.size)[0], message.question[0].rdtype)
            self._queries[(name, rdtype)] = kept
        return kept

    async def resolve(self, name: str, rdtype: str) -> Answer:
        try:
            wire, labels, qtype = self.question(name, rdtype)
        except dns.exception.DNSException as e:
            return Answer("error", error=f"{type(e).__name__}: {e}")
        question = secrets.token_bytes(2) + wire[2:]
        size = len(wire) - HEADER.size

        def read(data: bytes) -> Answer:
            return read_answer(data, name, rdtype, (size, labels, qtype))

        answer = await ask_each(question, self.servers, self.timeout, read, self.port)
        return Answer("error", error=str(answer)) if isinstance(answer, NoAnswer) else answer


def read_answer(data: bytes, name: str, rdtype: str, question: tuple[int, Labels, int]) -> Answer:
    """A nameserver's answer (its id and question matched) as the cache takes it. Raises Unusable for an
    answer to pass over: another rcode (`REFUSED`), or one dnspython's resolver would not take either."""
    rcode = data[3] & 0xF
    if rcode not in (NOERROR, NXDOMAIN):
        raise Unusable(dns.rcode.to_text(rcode))
    size, labels, qtype = question
    try:
        rcode, addresses, ttl = stub_answer(data, size, labels, qtype)
    except WireError:
        return read_with_dnspython(data, name, rdtype)
    if rcode == NXDOMAIN:
        return Answer("nxdomain", error=NXDOMAIN_TEXT)
    if not addresses:
        return Answer("ok")  # NOERROR with no data: the name has no records of this type
    return Answer("ok", addresses, ttl)


def read_with_dnspython(data: bytes, name: str, rdtype: str) -> Answer:
    """The answer as dnspython's resolver reads it (resolver._Resolution.query_result): the slow path, for
    what the fast reader passes on. Raises Unusable where dnspython's resolver would ask the next
    nameserver."""
    qname = dns.name.from_text(name + ".")
    try:
        message = dns.message.from_wire(data)
        rcode = message.rcode()
        if rcode == dns.rcode.NXDOMAIN:
            dns.resolver.Answer(qname, dns.rdatatype.ANY, dns.rdataclass.IN, message)  # the chain checked
            return Answer("nxdomain", error=NXDOMAIN_TEXT)
        if rcode != dns.rcode.NOERROR:
            raise Unusable(dns.rcode.to_text(rcode))
        answer = dns.resolver.Answer(qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, message)
    except Unusable:
        raise
    except Exception as e:  # noqa: BLE001 - as dnspython's resolver: any error reading an answer is the server's
        raise Unusable(str(e) or type(e).__name__) from None
    return _answer(answer)


def _answer(answer: dns.resolver.Answer) -> Answer:
    if answer.rrset is None:
        return Answer("ok")  # NOERROR with no data: the name has no records of this type
    ttl = answer.chaining_result.minimum_ttl  # the shortest TTL along the CNAME chain
    return Answer("ok", tuple(str(ipaddress.ip_address(r.address)) for r in answer.rrset), float(ttl))


class DnspythonLookup:
    """dnspython's asynchronous resolver, as the agent used it before the lean path: the baseline."""

    def __init__(self, servers: Sequence[str], timeout: float, port: int = DNS_PORT) -> None:
        self._resolver = dns.asyncresolver.Resolver(configure=False)
        self._resolver.port = port
        self._resolver.nameservers = list(servers)
        self._resolver.lifetime = timeout
        # Each nameserver gets its share of the lifetime: one that drops queries leaves time to ask the next.
        self._resolver.timeout = timeout / max(1, len(servers))
        self._resolver.cache = None  # our cache is the one that counts; never answer from a second one

    async def resolve(self, name: str, rdtype: str) -> Answer:
        try:
            answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("nxdomain", error=NXDOMAIN_TEXT)
        except dns.exception.DNSException as e:
            return Answer("error", error=describe(e))
        return _answer(answer)


def describe(exc: BaseException) -> str:
    """A dnspython resolver's failure in the words the lean path uses (NoAnswer)."""
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return str(NoAnswer((), True))
    if isinstance(exc, dns.resolver.NoNameservers):
        said = []
        for server, _tcp, _port, err, _response in exc.kwargs.get("errors", []):
            where = str(server).removeprefix("Do53:").rsplit("@", 1)[0]  # "Do53:192.0.2.53@53"
            said.append(f"{err} from {where}")  # err is the rcode's name (REFUSED, SERVFAIL) or an error
        return str(NoAnswer(tuple(said), False))
    return f"{type(exc).__name__}: {exc}"
