"""The proxy's fast path (intercept/wire.py) against dnspython's (messages.py): the same question upstream,
the same chain and addresses, the same reply; anything not plain goes to the slow path; malformed bytes
never raise anything but WireError."""

import contextlib
import ipaddress
import random

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egressd.intercept import messages as slow
from egressd.intercept import wire as fast

BLOCKED = (ipaddress.ip_network("169.254.0.0/16"), ipaddress.ip_network("fd00::/8"))


def query(name="a.test", rdtype="A", edns=True, rd=True, cd=False, options=()):
    q = dns.message.make_query(
        name, rdtype, use_edns=0 if edns else False, payload=1232, options=list(options)
    )
    q.flags = (dns.flags.RD if rd else 0) | (dns.flags.CD if cd else 0)
    return q.to_wire()


def upstream(question: bytes, answer=(), authority=(), additional=(), rcode=0, edns=True):
    """An upstream's answer to the question the proxy sent: records are (owner, ttl, type, *values)."""
    q = dns.message.from_wire(question)
    out = dns.message.make_response(q)
    if not edns:
        out.use_edns(False)
    out.set_rcode(rcode)
    for section, records in ((out.answer, answer), (out.authority, authority), (out.additional, additional)):
        for owner, ttl, rdtype, *values in records:
            section.append(dns.rrset.from_text_list(owner, ttl, "IN", rdtype, list(values)))
    return out.to_wire()


def both(wire: bytes, answer_for, max_ttl=60, size=None):
    """(fast, slow) each as (chain, addresses, the reply parsed)."""
    fq, sq = fast.parse_query(wire), slow.parse_query(wire)
    question = fast.upstream_question(fq)
    data = answer_for(question)
    fa = fast.read_answer(fq, data)
    message, found = slow.read_answer(sq, data)
    limit = size or fq.payload
    f_reply = fast.reply(fq, fa, max_ttl, BLOCKED, limit)
    s_reply = slow.to_wire(slow.sandbox_reply(sq, message, found, max_ttl, BLOCKED), limit)
    return (fa.chain, fa.addresses, f_reply), (found.chain, found.addresses, s_reply)


def same_reply(a: bytes, b: bytes) -> None:
    x, y = dns.message.from_wire(a), dns.message.from_wire(b)
    assert (x.id, x.flags, x.rcode(), x.question) == (y.id, y.flags, y.rcode(), y.question)
    assert (x.edns, x.payload, x.options) == (y.edns, y.payload, y.options)
    for sx, sy in ((x.answer, y.answer), (x.authority, y.authority)):
        lines = [sorted(line for r in rrsets for line in str(r).splitlines()) for rrsets in (sx, sy)]
        assert lines[0] == lines[1]  # owner, TTL, type and data of every record, in any order


CASES = {
    "one address": dict(answer=[("a.test.", 30, "A", "198.51.100.7")]),
    "forty addresses": dict(answer=[("a.test.", 300, "A", *(f"203.0.113.{i}" for i in range(10, 50)))]),
    "both families and mixed TTLs": dict(
        answer=[("a.test.", 20, "A", "192.0.2.1", "192.0.2.2"), ("a.test.", 90, "AAAA", "2001:db8::1")]
    ),
    "a chain, and records off it": dict(
        answer=[
            ("a.test.", 300, "CNAME", "B.cdn.test."),
            ("b.cdn.test.", 10, "CNAME", "c.cdn.test."),
            ("c.cdn.test.", 50, "A", "198.51.100.9"),
            ("other.test.", 50, "A", "198.51.100.66"),
        ]
    ),
    "rebinding addresses among good ones": dict(
        answer=[
            ("a.test.", 30, "A", "169.254.169.254", "192.0.2.5"),
            ("a.test.", 30, "AAAA", "fd00::1"),
        ]
    ),
    "a chain loop": dict(answer=[("a.test.", 30, "CNAME", "b.test."), ("b.test.", 30, "CNAME", "a.test.")]),
    "no such name": dict(
        rcode=dns.rcode.NXDOMAIN,
        authority=[("test.", 900, "SOA", "ns.test. host.test. 1 2 3 4 5"), ("test.", 900, "NS", "ns.test.")],
    ),
    "no data, glue and no EDNS upstream": dict(
        authority=[("test.", 30, "SOA", "ns.test. host.test. 1 2 3 4 5")],
        additional=[("ns.test.", 30, "A", "192.0.2.53")],
        edns=False,
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("edns", [True, False])
@pytest.mark.parametrize("rd", [True, False])
def test_the_fast_path_says_and_replies_what_dnspython_does(case, edns, rd):
    wire = query("A.Test", edns=edns, rd=rd, cd=not rd)
    f, s = both(wire, lambda q: upstream(q, **CASES[case]))
    assert f[:2] == s[:2]  # the chain and the addresses with their TTLs
    same_reply(f[2], s[2])


def test_the_question_upstream_is_the_same_as_dnspythons_but_for_the_id():
    wire = query("Mixed.CASE.test", "AAAA", cd=True)
    ours = dns.message.from_wire(fast.upstream_question(fast.parse_query(wire)))
    theirs = slow.upstream_query(slow.parse_query(wire))
    assert (ours.question, ours.flags, ours.edns, ours.payload, ours.options) == (
        theirs.question,
        theirs.flags,
        theirs.edns,
        theirs.payload,
        theirs.options,
    )
    assert ours.id != dns.message.from_wire(wire).id or ours.id == 0  # a new id (0 once in 65,536)


def test_an_answer_too_big_for_the_client_goes_out_empty_with_tc():
    wire = query(edns=False)  # 512 bytes at most
    big = dict(answer=[("a.test.", 30, "A", *(f"198.51.100.{i}" for i in range(1, 60)))])
    f, s = both(wire, lambda q: upstream(q, **big))
    x, y = dns.message.from_wire(f[2]), dns.message.from_wire(s[2])
    assert x.flags & dns.flags.TC and y.flags & dns.flags.TC and not x.answer and len(f[2]) <= 512
    assert f[:2] == s[:2]  # learned the same all the same: the client asks again over TCP


def test_refusals_match():
    for wire in (query(), query(edns=False, rd=False)):
        fq, sq = fast.parse_query(wire), slow.parse_query(wire)
        for rcode in (dns.rcode.REFUSED, dns.rcode.NXDOMAIN, dns.rcode.SERVFAIL):
            same_reply(fast.refusal(fq, rcode), slow.to_wire(slow.reply(sq.message, rcode), fq.payload))


def test_what_is_not_plain_goes_to_the_slow_path():
    two = dns.message.make_query("a.test", "A")
    two.question.append(dns.rrset.RRset(dns.name.from_text("b.test"), 1, 1))
    chaos = dns.message.make_query("a.test", "TXT", rdclass="CH")
    weird = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + b"\x03a\x00b\x04test\x00\x00\x01\x00\x01"
    for wire in (
        query(options=[dns.edns.GenericOption(65001, b"x")]),  # an EDNS option: a covert channel, slow path
        two.to_wire(),
        chaos.to_wire(),
        weird,  # a NUL inside a label
        query() + b"\0",  # trailing bytes
        query()[:-3],
    ):
        with pytest.raises(fast.WireError):
            fast.parse_query(wire)
    fq = fast.parse_query(query("a.test", "TXT"))
    txt = upstream(fast.upstream_question(fq), answer=[("a.test.", 30, "TXT", '"v=spf1"')])
    with pytest.raises(fast.WireError):  # another record type in the answer: dnspython reads it
        fast.read_answer(fq, txt)


def mutated(rng: random.Random, samples: list[bytes], count: int = 3000):
    """count of the samples, each with 1 to 4 random bytes changed, about a third of them cut short."""
    for _ in range(count):
        data = bytearray(rng.choice(samples))
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        yield bytes(data)


def test_malformed_bytes_only_ever_raise_wire_error():
    rng = random.Random(18)
    fq = fast.parse_query(query())
    question = fast.upstream_question(fq)
    samples = [upstream(question, **c) for c in CASES.values()]
    for data in mutated(rng, samples):
        for read in (lambda d: fast.read_answer(fq, d), fast.parse_query):
            with contextlib.suppress(fast.WireError):
                read(data)
