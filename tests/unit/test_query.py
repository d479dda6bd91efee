"""The agent's resolver (desired/query.py): the lean path against dnspython's resolver, on the same answers from
small scripted servers on loopback (no root, no traffic leaves the machine). Both must give the same Answer:
the same addresses and TTL, NXDOMAIN, the same error; malformed bytes only ever fall back or fail."""

import asyncio
import contextlib
import random
import socket
import struct
import time

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egressd.common.dnsupstream import Unusable, matches
from egressd.common.dnswire import WireError, stub_answer
from egressd.desired.dnscache import Answer
from egressd.desired.query import DnspythonLookup, WireLookup, read_answer, read_with_dnspython
from egressd.desired.resolve import Resolver
from tests.unit.test_wire import mutated

ENGINES = ("wire", "dnspython")
SOA = ("test.", 900, "SOA", "ns.test. host.test. 1 2 3 4 5")


def respond(
    query: bytes, answer=(), authority=(), additional=(), rcode=0, question=None, edns=False, extra=b""
) -> bytes:
    """The answer to query: records are (owner, ttl, type, *values); question: another name, same id;
    extra: one more answer record, as bytes (only without authority and additional records)."""
    q = dns.message.from_wire(query)
    if question is not None:
        q = dns.message.make_query(question, q.question[0].rdtype, id=q.id)
    out = dns.message.make_response(q)
    if edns:
        out.use_edns(0)
    out.set_rcode(rcode)
    for section, records in ((out.answer, answer), (out.authority, authority), (out.additional, additional)):
        for owner, ttl, rdtype, *values in records:
            section.append(dns.rrset.from_text_list(owner, ttl, "IN", rdtype, list(values)))
    wire = out.to_wire()
    if extra:
        wire = wire[:6] + struct.pack("!H", struct.unpack_from("!H", wire, 6)[0] + 1) + wire[8:] + extra
    return wire


class Udp(asyncio.DatagramProtocol):
    def __init__(self, script, seen):
        self.script, self.seen = script, seen

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.seen.append(data)
        for out in self.script(data):
            if isinstance(out, tuple):  # (seconds, datagram): sent that much later
                asyncio.get_running_loop().call_later(out[0], self.transport.sendto, out[1], addr)
            else:
                self.transport.sendto(out, addr)


async def servers(scripts, tcp=None, family=socket.AF_INET):
    """A UDP server per script on one port, at 127.0.0.1, 127.0.0.2, ... (::1 alone for IPv6); tcp: one
    script for TCP on the first address. (addresses, port, what each was sent, things to close)."""
    loop = asyncio.get_running_loop()
    hosts = ["::1"] if family == socket.AF_INET6 else [f"127.0.0.{i + 1}" for i in range(len(scripts))]
    seen, closers, port = [], [], 0
    for host, script in zip(hosts, scripts, strict=True):
        got: list[bytes] = []
        transport, _ = await loop.create_datagram_endpoint(
            lambda s=script, g=got: Udp(s, g), local_addr=(host, port)
        )
        port = transport.get_extra_info("sockname")[1]
        seen.append(got)
        closers.append(transport)
    if tcp is not None:

        async def on_tcp(reader, writer):
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
                (size,) = struct.unpack("!H", await reader.readexactly(2))
                for out in tcp(await reader.readexactly(size)):
                    writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
            writer.close()

        closers.append(await asyncio.start_server(on_tcp, hosts[0], port))
    return hosts, port, seen, closers


def resolve_with(engine, scripts, name="a.test", rdtype="A", timeout=1.0, tcp=None, family=socket.AF_INET):
    """The engine's Answer, what each server was sent, and how long it took."""

    async def scenario():
        hosts, port, seen, closers = await servers(scripts, tcp, family)
        try:
            resolver = Resolver(hosts, timeout, port=port, engine=engine)
            t0 = time.monotonic()
            answer = await resolver.resolve(name, rdtype)
            return answer, seen, time.monotonic() - t0
        finally:
            for c in closers:
                c.close()

    return asyncio.run(scenario())


def both(scripts, **kw):
    """{engine: Answer}, after checking both asked each server the same number of times."""
    out, asked = {}, {}
    for engine in ENGINES:
        answer, seen, _ = resolve_with(engine, scripts, **kw)
        out[engine] = same_order(answer)
        asked[engine] = [len(s) for s in seen]
    assert asked["wire"] == asked["dnspython"]
    return out


def same_order(answer: Answer) -> Answer:
    """dnspython writes a record set's records in a random order: the addresses as a sorted tuple."""
    return Answer(answer.kind, tuple(sorted(answer.addresses)), answer.ttl, answer.error)


def answering(**records):
    return lambda q: [respond(q, **records)]


CHAIN = [
    ("a.test.", 300, "CNAME", "B.cdn.test."),
    ("b.cdn.test.", 10, "CNAME", "c.cdn.test."),
    ("c.cdn.test.", 50, "A", "198.51.100.9", "198.51.100.10"),
    ("c.cdn.test.", 40, "AAAA", "2001:db8::9"),
    ("other.test.", 5, "A", "198.51.100.66"),
]
PLAIN = {  # what the byte-level reader reads itself
    "one address": dict(answer=[("a.test.", 30, "A", "198.51.100.7")]),
    "forty addresses": dict(answer=[("a.test.", 300, "A", *(f"203.0.113.{i}" for i in range(10, 50)))]),
    "both families": dict(answer=[("a.test.", 20, "A", "192.0.2.1"), ("a.test.", 90, "AAAA", "2001:db8::1")]),
    "the name in another case": dict(answer=[("A.TeSt.", 30, "A", "198.51.100.7")]),
    "an address in long form": dict(answer=[("a.test.", 30, "AAAA", "2001:db8:0:0:0:0:0:1")]),
    "a chain, and records off it": dict(answer=CHAIN),
    "a chain to nothing": dict(answer=CHAIN[:2], authority=[SOA]),
    "no data": dict(authority=[SOA]),
    "no data, no SOA, EDNS": dict(edns=True),
    "no such name": dict(rcode=dns.rcode.NXDOMAIN, authority=[SOA, ("test.", 900, "NS", "ns.test.")]),
    "no such name after a chain": dict(rcode=dns.rcode.NXDOMAIN, answer=CHAIN[:1], authority=[SOA]),
    "a TTL with the high bit set": dict(  # is 0 (RFC 2181)
        answer=[("a.test.", 30, "CNAME", "b.test.")],
        extra=b"\x01b\x04test\x00" + struct.pack("!HHIH", 1, 1, 0x80000009, 4) + bytes([192, 0, 2, 2]),
    ),
    "glue in the additional section": dict(
        answer=[("a.test.", 30, "A", "198.51.100.7")], additional=[("ns.test.", 30, "A", "192.0.2.53")]
    ),
}
LOOP = [("a.test.", 30, "CNAME", "b.test."), ("b.test.", 30, "CNAME", "a.test.")]
LONG = [(f"n{i}.test.", 30, "CNAME", f"n{i + 1}.test.") for i in range(20)] + [
    ("n20.test.", 30, "A", "192.0.2.1")
]
ODD = {  # what the byte-level reader hands to dnspython
    "a chain loop": dict(answer=LOOP),
    "a chain loop beside NXDOMAIN": dict(answer=LOOP, rcode=dns.rcode.NXDOMAIN),
    "a chain too long": dict(answer=[("a.test.", 30, "CNAME", "n0.test."), *LONG]),
    "a chain of 15 names": dict(answer=[("a.test.", 30, "CNAME", "n6.test."), *LONG[6:]]),
    "a CNAME beside addresses": dict(
        answer=[("a.test.", 30, "CNAME", "b.test."), ("a.test.", 20, "A", "192.0.2.1"), ("b.test.", 9, "A", "192.0.2.2")]
    ),
    "a CNAME with two targets": dict(  # dnspython takes the last one
        answer=[("a.test.", 30, "CNAME", "b.test."), ("b.test.", 9, "A", "192.0.2.2"), ("c.test.", 9, "A", "192.0.2.3")],
        extra=b"\xc0\x0c" + struct.pack("!HHIH", 5, 1, 30, 8) + b"\x01c\x04test\x00",
    ),
    "another record type": dict(answer=[("a.test.", 30, "TXT", '"v=spf1"'), ("a.test.", 30, "A", "192.0.2.1")]),
    "addresses beside NXDOMAIN": dict(answer=[("a.test.", 30, "A", "192.0.2.1")], rcode=dns.rcode.NXDOMAIN),
    "REFUSED": dict(rcode=dns.rcode.REFUSED),
    "SERVFAIL": dict(rcode=dns.rcode.SERVFAIL),
    "NOTIMP": dict(rcode=dns.rcode.NOTIMP),
    "an extended rcode": dict(rcode=dns.rcode.BADVERS, edns=True),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(PLAIN))
@pytest.mark.parametrize("rdtype", ["A", "AAAA"])
def test_the_lean_path_reads_plain_answers_as_dnspython_does(case, rdtype):
    got = both([answering(**PLAIN[case])], rdtype=rdtype)
    assert got["wire"] == got["dnspython"]
    assert got["wire"].kind in ("ok", "nxdomain")
    query = dns.message.make_query("a.test.", rdtype).to_wire()
    stub_answer(respond(query, **PLAIN[case]), len(query) - 12, (b"a", b"test"), 1 if rdtype == "A" else 28)


def test_the_figures_of_the_plain_cases():
    chain = both([answering(**PLAIN["a chain, and records off it"])])["wire"]
    assert chain == Answer("ok", ("198.51.100.10", "198.51.100.9"), 10.0)  # the chain's shortest TTL
    six = both([answering(**PLAIN["an address in long form"])], rdtype="AAAA")["wire"]
    assert six == Answer("ok", ("2001:db8::1",), 30.0)
    assert both([answering(**PLAIN["no data"])])["wire"] == Answer("ok")
    assert both([answering(**PLAIN["no such name"])])["wire"].kind == "nxdomain"


@pytest.mark.parametrize("case", sorted(ODD))
def test_what_the_lean_path_does_not_read_itself_dnspython_reads_the_same(case):
    got = both([answering(**ODD[case])])
    assert got["wire"] == got["dnspython"]
    query = dns.message.make_query("a.test.", "A").to_wire()
    with pytest.raises(WireError):
        stub_answer(respond(query, **ODD[case]), len(query) - 12, (b"a", b"test"), 1)


def test_errors_say_what_each_nameserver_said():
    got = both([answering(rcode=dns.rcode.REFUSED), answering(rcode=dns.rcode.SERVFAIL)])
    assert (
        got["wire"]
        == got["dnspython"]
        == Answer("error", error="no nameserver answered: REFUSED from 127.0.0.1, SERVFAIL from 127.0.0.2")
    )
    assert both([answering(answer=LOOP)])["wire"].error == (
        "no nameserver answered: The CNAME chain is too long. from 127.0.0.1"
    )


def test_a_refusing_or_failing_nameserver_is_passed_over_for_the_next():
    good = answering(**PLAIN["one address"])
    for first in (answering(rcode=dns.rcode.REFUSED), answering(rcode=dns.rcode.SERVFAIL)):
        got = both([first, good])
        assert got["wire"] == got["dnspython"] == Answer("ok", ("198.51.100.7",), 30.0)


def test_a_silent_nameserver_has_its_share_of_the_timeout_then_the_next_is_asked():
    good = answering(**PLAIN["one address"])
    for engine in ENGINES:
        answer, seen, took = resolve_with(engine, [lambda q: [], good], timeout=1.0)
        assert answer == Answer("ok", ("198.51.100.7",), 30.0), engine
        assert 0.45 <= took < 0.95 and [len(s) for s in seen] == [1, 1]
        answer, _, took = resolve_with(engine, [lambda q: []], timeout=0.3)
        assert answer == Answer("error", error="timeout: no answer from the nameservers")
        assert 0.25 <= took < 1.0


def test_a_nameserver_that_refuses_at_once_leaves_its_share_to_the_next():
    slow = answering(**PLAIN["one address"])

    def late(q):  # answers after 0.4 s: past half of the 0.6 s, within what the refusal left
        return [(0.4, out) for out in slow(q)]

    answer, _, took = resolve_with("wire", [answering(rcode=dns.rcode.REFUSED), late], timeout=0.6)
    assert answer == Answer("ok", ("198.51.100.7",), 30.0) and took >= 0.4


def test_only_the_answer_to_this_question_is_taken():
    def script(q):
        wrong_id = bytearray(respond(q, answer=[("a.test.", 30, "A", "192.0.2.66")]))
        wrong_id[:2] = struct.pack("!H", (struct.unpack("!H", q[:2])[0] + 1) % 65536)
        return [
            bytes(wrong_id),
            b"\x00",
            respond(q, answer=[("b.test.", 30, "A", "192.0.2.67")], question="b.test"),  # another question
            q,  # the query itself: not a response
            respond(q, answer=[("a.test.", 30, "A", "192.0.2.1")]),
        ]

    got = both([script])
    assert got["wire"] == got["dnspython"] == Answer("ok", ("192.0.2.1",), 30.0)


def test_a_truncated_answer_is_asked_again_over_tcp():
    def truncated(q):
        out = dns.message.make_response(dns.message.from_wire(q))
        out.flags |= dns.flags.TC
        return [out.to_wire()]

    many = dict(answer=[("a.test.", 60, "A", *(f"198.51.100.{i}" for i in range(1, 61)))])
    got = both([truncated], tcp=answering(**many))
    assert got["wire"] == got["dnspython"] and len(got["wire"].addresses) == 60


def test_an_ipv6_nameserver():
    got = both([answering(**PLAIN["both families"])], rdtype="AAAA", family=socket.AF_INET6)
    assert got["wire"] == got["dnspython"] == Answer("ok", ("2001:db8::1",), 90.0)


def test_the_question_is_dnspythons_but_for_the_id_and_is_built_once():
    sent = {}
    for engine in ENGINES:
        _, seen, _ = resolve_with(
            engine, [answering(**PLAIN["one address"])], name="Mixed.CASE.test", rdtype="AAAA"
        )
        sent[engine] = seen[0][0]
    assert sent["wire"][2:] == sent["dnspython"][2:]
    lookup = WireLookup(["192.0.2.53"], 1.0)
    assert lookup.question("a.test", "A") is lookup.question("a.test", "A")


def test_the_engine_and_the_system_nameservers():
    import dns.resolver

    assert Resolver(["192.0.2.53"]).engine == "wire"
    assert isinstance(Resolver(["192.0.2.53"], engine="dnspython")._lookup, DnspythonLookup)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EGRESSD_RESOLVER", "dnspython")
        assert Resolver(["192.0.2.53"]).engine == "dnspython"
    with pytest.raises(ValueError):
        Resolver(["192.0.2.53"], engine="bind")
    try:
        system = dns.resolver.Resolver(configure=True).nameservers  # no query is sent
    except dns.resolver.NoResolverConfiguration:
        pytest.skip("no resolv.conf on this machine")
    assert Resolver()._lookup.servers == system


def test_malformed_answers_fall_back_or_fail_and_never_differ_from_dnspython():
    rng = random.Random(19)
    query = dns.message.make_query("a.test.", "A", id=0x1234).to_wire()
    size, labels = len(query) - 12, (b"a", b"test")
    samples = [respond(query, **case) for case in (*PLAIN.values(), *ODD.values())]
    for data in mutated(rng, samples):
        if not matches(query, data):
            continue  # never read: the wait for the answer goes on
        with contextlib.suppress(WireError):
            stub_answer(data, size, labels, 1)
        try:
            ours: Answer | str = read_answer(data, "a.test", "A", (size, labels, 1))
        except Unusable as e:
            ours = str(e)
        try:
            theirs: Answer | str = read_with_dnspython(data, "a.test", "A")
        except Unusable as e:
            theirs = str(e)
        if isinstance(ours, Answer) or isinstance(theirs, Answer):
            assert ours == theirs, data.hex()
