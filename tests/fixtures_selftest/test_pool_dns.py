"""Self-test of netns_fixtures.pool_dns: a CDN-like DNS upstream in the world's internet, asked from a sandbox.

Needs root (network namespaces). Every query is made by dnspython in a short-lived thread that entered the
sandbox's namespace, so it crosses the world's veths and router to the server's sockets in the inet namespace.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from collections import Counter
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from netns_fixtures import World, call_in_netns, cleanup
from netns_fixtures._nsutil import list_namespaces, run
from netns_fixtures.pool_dns import PoolDnsServer

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

SERVER4 = "192.0.2.153"
SERVER6 = "2001:db8:53::153"
TTL = 30
POOL4 = [f"198.51.100.{i}" for i in range(1, 5)]
POOL6 = [f"2001:db8:cd::{i}" for i in range(1, 5)]
MANY4 = [f"203.0.113.{i}" for i in range(1, 41)]  # 40 A records: 40*16 bytes alone are over 512
MANY6 = [f"2001:db8:b16::{i:x}" for i in range(1, 41)]
ZONES = {
    "cdn.example.test": POOL4 + POOL6,
    "www.example.test": {"cname": "edge.example.test"},
    "edge.example.test": {"cname": "Edge2.Example.Test."},
    "edge2.example.test": {"cname": "cdn.example.test"},
    "big.example.test": {"many": MANY4 + MANY6},
    "v4only.example.test": ["192.0.2.77"],
    "dangling.example.test": {"cname": "missing.example.test"},
    "loop1.example.test": {"cname": "loop2.example.test"},
    "loop2.example.test": {"cname": "loop1.example.test"},
}


def _prefix(tag: str) -> str:
    return f"nfpd{os.getpid() % 10000}{tag}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    prefix = _prefix("m")
    cleanup(prefix)
    with World(prefix, sandboxes=1) as w:
        yield w
    assert list_namespaces(prefix) == []


@pytest.fixture(scope="module")
def module_server(world: World) -> Iterator[PoolDnsServer]:
    with PoolDnsServer(world.inet, SERVER4, ZONES, ttl=TTL) as srv:
        yield srv


@pytest.fixture
def server(module_server: PoolDnsServer) -> PoolDnsServer:
    module_server.reset_counts()
    return module_server


@pytest.fixture
def client(world: World) -> str:
    return world.sandboxes[0].name


def ask(
    ns: str,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    payload: int | None = None,
    server: str = SERVER4,
    timeout: float = 1.0,
) -> dns.message.Message:
    """One query from ``ns``; EDNS with ``payload`` when given, else no EDNS (the 512-byte UDP limit)."""
    query = dns.message.make_query(name, qtype, use_edns=0 if payload else False, payload=payload or 1232)

    def go() -> dns.message.Message:
        if tcp:
            return dns.query.tcp(query, server, timeout=timeout)
        return dns.query.udp(query, server, timeout=timeout)

    return call_in_netns(ns, go, timeout=timeout + 2.0)


def records(reply: dns.message.Message) -> list[tuple[str, str, str]]:
    """(owner, type, data) of every answer record, in order; owners lower-case without the final dot."""
    return [
        (rrset.name.to_text(omit_final_dot=True).lower(), dns.rdatatype.to_text(rrset.rdtype), rd.to_text())
        for rrset in reply.answer
        for rd in rrset
    ]


def addresses(reply: dns.message.Message) -> list[str]:
    return [data for _, rdtype, data in records(reply) if rdtype in ("A", "AAAA")]


# --------------------------------------------------------------------------- pools
@pytest.mark.parametrize(("qtype", "pool", "tcp"), [("A", POOL4, False), ("AAAA", POOL6, True)])
def test_pool_answers_one_random_address_of_the_family(
    server: PoolDnsServer, client: str, qtype: str, pool: list[str], tcp: bool
) -> None:
    seen = []
    for _ in range(30):
        reply = ask(client, "cdn.example.test", qtype, tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert len(reply.answer) == 1 and reply.answer[0].ttl == TTL
        (addr,) = addresses(reply)
        seen.append(addr)
    assert set(seen) <= set(pool)
    assert len(set(seen)) > 1  # 4 addresses, 30 picks: all equal has probability 4**-29
    transport = "tcp" if tcp else "udp"
    assert server.queries == Counter({("cdn.example.test", qtype, transport): 30})
    assert server.answered == Counter(("cdn.example.test", a) for a in seen)


def test_a_pool_without_the_family_is_nodata(server: PoolDnsServer, client: str) -> None:
    reply = ask(client, "v4only.example.test", "AAAA")
    assert reply.rcode() == dns.rcode.NOERROR and reply.answer == []
    assert addresses(ask(client, "v4only.example.test", "A")) == ["192.0.2.77"]


# --------------------------------------------------------------------------- CNAMEs
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_cname_chain_comes_back_whole(server: PoolDnsServer, client: str, tcp: bool) -> None:
    reply = ask(client, "WWW.example.test.", "AAAA", tcp=tcp)
    assert reply.rcode() == dns.rcode.NOERROR
    got = records(reply)
    assert got[:3] == [
        ("www.example.test", "CNAME", "edge.example.test."),
        ("edge.example.test", "CNAME", "edge2.example.test."),
        ("edge2.example.test", "CNAME", "cdn.example.test."),
    ]
    assert len(got) == 4 and got[3][:2] == ("cdn.example.test", "AAAA") and got[3][2] in POOL6
    assert all(rrset.ttl == TTL for rrset in reply.answer)
    # The aliases were never asked: only the name the client sent is counted, and what it was handed.
    assert server.names_seen() == {"www.example.test"}
    assert server.answered == Counter({("www.example.test", got[3][2]): 1})


def test_cname_query_type_and_broken_chains(server: PoolDnsServer, client: str) -> None:
    assert records(ask(client, "www.example.test", "CNAME")) == [
        ("www.example.test", "CNAME", "edge.example.test.")
    ]
    dangling = ask(client, "dangling.example.test")
    assert dangling.rcode() == dns.rcode.NXDOMAIN
    assert records(dangling) == [("dangling.example.test", "CNAME", "missing.example.test.")]
    loop = ask(client, "loop1.example.test")
    assert loop.rcode() == dns.rcode.SERVFAIL and loop.answer == []


def test_a_resolver_follows_the_chain(server: PoolDnsServer, client: str) -> None:
    def go() -> dns.resolver.Answer:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [SERVER4]
        res.timeout = res.lifetime = 1.0
        return res.resolve("www.example.test", "A", search=False)

    answer = call_in_netns(client, go, timeout=3.0)
    assert answer.canonical_name.to_text() == "cdn.example.test."
    assert {rd.address for rd in answer} <= set(POOL4) and len(answer) == 1


# --------------------------------------------------------------------------- many and truncation
def test_many_is_truncated_over_udp_without_edns_and_whole_over_tcp(
    server: PoolDnsServer, client: str
) -> None:
    udp = ask(client, "big.example.test", "A")
    assert udp.flags & dns.flags.TC
    assert udp.answer == [] and udp.rcode() == dns.rcode.NOERROR
    tcp = ask(client, "big.example.test", "A", tcp=True)
    assert not tcp.flags & dns.flags.TC
    assert sorted(addresses(tcp), key=ipaddress.ip_address) == MANY4
    edns = ask(client, "big.example.test", "AAAA", payload=4096)  # 40 AAAA fit in 4096 bytes
    assert not edns.flags & dns.flags.TC and len(addresses(edns)) == 40
    small = ask(client, "big.example.test", "AAAA", payload=1024)  # 40*28 + header + question > 1024
    assert small.flags & dns.flags.TC and small.answer == []
    assert server.truncated == 2
    assert server.queries == Counter(
        {
            ("big.example.test", "A", "udp"): 1,
            ("big.example.test", "A", "tcp"): 1,
            ("big.example.test", "AAAA", "udp"): 2,
        }
    )
    # The truncated answers handed nothing out.
    assert server.answered == Counter(("big.example.test", a) for a in MANY4 + MANY6)


def test_a_resolver_retries_a_truncated_answer_over_tcp(server: PoolDnsServer, client: str) -> None:
    def go() -> dns.resolver.Answer:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [SERVER4]
        res.timeout = res.lifetime = 1.0
        res.use_edns(False)
        return res.resolve("big.example.test", "A", search=False)

    answer = call_in_netns(client, go, timeout=3.0)
    assert len(answer) == 40
    assert server.query_count("big.example.test", "A", "udp") == 1
    assert server.query_count("big.example.test", "A", "tcp") == 1


# --------------------------------------------------------------------------- other types, unknown names
@pytest.mark.parametrize("tcp", [False, True], ids=["udp", "tcp"])
def test_unknown_names_are_nxdomain(server: PoolDnsServer, client: str, tcp: bool) -> None:
    for qtype in ("A", "AAAA", "TXT"):
        reply = ask(client, "nope.example.test", qtype, tcp=tcp)
        assert reply.rcode() == dns.rcode.NXDOMAIN and reply.answer == []
    assert server.query_count("nope.example.test") == 3
    assert server.answered == Counter()


def test_txt_is_ok_for_known_names_and_other_types_nodata(server: PoolDnsServer, client: str) -> None:
    assert records(ask(client, "cdn.example.test", "TXT")) == [("cdn.example.test", "TXT", '"ok"')]
    via = records(ask(client, "edge2.example.test", "TXT", tcp=True))
    assert via == [("edge2.example.test", "CNAME", "cdn.example.test."), ("cdn.example.test", "TXT", '"ok"')]
    mx = ask(client, "cdn.example.test", "MX")
    assert mx.rcode() == dns.rcode.NOERROR and mx.answer == []


# --------------------------------------------------------------------------- counting
def test_counters_count_what_was_asked(server: PoolDnsServer, client: str) -> None:
    ask(client, "CDN.Example.Test.", "A")
    ask(client, "cdn.example.test", "A", tcp=True)
    ask(client, "cdn.example.test", "TXT")
    ask(client, "nope.example.test", "AAAA", tcp=True)
    ask(client, "www.example.test", "A")
    assert server.queries == Counter(
        {
            ("cdn.example.test", "A", "udp"): 1,
            ("cdn.example.test", "A", "tcp"): 1,
            ("cdn.example.test", "TXT", "udp"): 1,
            ("nope.example.test", "AAAA", "tcp"): 1,
            ("www.example.test", "A", "udp"): 1,
        }
    )
    assert server.names_seen() == {"cdn.example.test", "nope.example.test", "www.example.test"}
    assert "edge.example.test" not in server.names_seen()  # reached only through the chain
    assert server.query_count("cdn.example.test") == 3
    assert server.query_count(qtype="A") == 3
    assert server.query_count(transport="tcp") == 2
    assert sum(n for (name, _), n in server.answered.items() if name == "cdn.example.test") == 2
    assert sum(n for (name, _), n in server.answered.items() if name == "www.example.test") == 1


def test_zones_change_while_it_runs(server: PoolDnsServer, client: str) -> None:
    try:
        server.set("new.example.test", {"pool": ["192.0.2.200"]})
        assert addresses(ask(client, "new.example.test")) == ["192.0.2.200"]
        server.remove("new.example.test")
        assert ask(client, "new.example.test").rcode() == dns.rcode.NXDOMAIN
    finally:
        server.remove("new.example.test")


def test_bad_zones_are_refused() -> None:
    with pytest.raises(ValueError):
        PoolDnsServer("unused", SERVER4, {"x.test": ["not-an-ip"]})
    with pytest.raises(ValueError):
        PoolDnsServer("unused", SERVER4, {"x.test": {"cname": "y.test", "pool": []}})


# --------------------------------------------------------------------------- IPv6 and shutdown
def test_ipv6_address_both_transports_and_clean_shutdown(world: World, client: str) -> None:
    with PoolDnsServer(world.inet, SERVER6, ZONES, ttl=5, seed=1) as srv:
        thread = srv._thread
        assert addresses(ask(client, "v4only.example.test", server=SERVER6)) == ["192.0.2.77"]
        reply = ask(client, "big.example.test", "AAAA", tcp=True, server=SERVER6)
        assert len(addresses(reply)) == 40 and reply.answer[0].ttl == 5
        assert srv.query_count(transport="udp") == 1 and srv.query_count(transport="tcp") == 1
        # a TCP connection the client leaves open must not hold up the shutdown
        held = call_in_netns(client, lambda: socket.create_connection((SERVER6, 53), timeout=1.0))
    try:
        assert thread is not None and not thread.is_alive()
        assert srv._udp is None and srv._tcp is None
        # the address the fixture put on lo is gone again, and the port answers no more
        assert SERVER6 not in run(["ip", "-n", world.inet, "-6", "addr", "show", "dev", "lo"]).stdout
        assert held.recv(1) == b""  # the server side closed the held connection
    finally:
        held.close()
    with pytest.raises(dns.exception.Timeout):
        ask(client, "v4only.example.test", server=SERVER6, timeout=0.3)


def test_close_frees_the_address_for_the_next_server(world: World, client: str) -> None:
    for _ in range(2):
        with PoolDnsServer(world.inet, "192.0.2.155", {"a.test": ["192.0.2.1"]}) as srv:
            assert addresses(ask(client, "a.test", server="192.0.2.155", tcp=True)) == ["192.0.2.1"]
        assert srv._udp is None
    with pytest.raises(dns.exception.Timeout):
        ask(client, "a.test", server="192.0.2.155", timeout=0.3)
