"""Self-test of netns_fixtures.dns: a real dnsmasq in the world's internet, changed while it runs.

Needs root (network namespaces) and dnsmasq (Debian's dnsmasq-base). Clients are dnspython stub resolvers
running in a short-lived thread that entered the router's or the sandbox's namespace, so every query
crosses the world's veths and routing exactly like egressd's own would.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import dns.exception
import dns.flags
import dns.rcode
import dns.rdatatype
import dns.resolver
import pytest

from netns_fixtures import DnsServer, World, call_in_netns, cleanup, dns_query
from netns_fixtures._nsutil import list_namespaces

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
    pytest.mark.skipif(
        shutil.which("dnsmasq") is None, reason="needs dnsmasq (apt-get install dnsmasq-base)"
    ),
]

TTL = 1
LIFETIME = 1.0  # every resolution below is bounded by this (plus thread start-up)


def _prefix(tag: str) -> str:
    return f"nfdn{os.getpid() % 10000}{tag}"


def _dnsmasq_pids(prefix: str) -> list[int]:
    """dnsmasq processes started for this prefix (their command line names our temp dir)."""
    proc = subprocess.run(["pgrep", "-f", f"dnsmasq-{prefix}"], capture_output=True, text=True, timeout=10)
    return [int(p) for p in proc.stdout.split() if int(p) != os.getpid()]


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def resolve(
    ns: str, server: str, name: str, rdtype: str = "A", *, tcp: bool = False, lifetime: float = LIFETIME
) -> dns.resolver.Answer:
    """dnspython's stub resolver, run inside ``ns`` (its sockets are created by the thread in ``ns``)."""

    def go() -> dns.resolver.Answer:
        res = dns.resolver.Resolver(configure=False)
        res.nameservers = [server]
        res.timeout = res.lifetime = lifetime
        res.cache = None
        return res.resolve(name, rdtype, tcp=tcp, search=False)

    return call_in_netns(ns, go, timeout=lifetime + 2.0)


def addresses(answer: dns.resolver.Answer) -> set[str]:
    return {rd.address for rd in answer}


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    prefix = _prefix("m")
    cleanup(prefix)
    with World(prefix, sandboxes=1) as w:
        yield w
    assert list_namespaces(prefix) == []
    assert _dnsmasq_pids(prefix) == []


@pytest.fixture(scope="module")
def server(world: World) -> Iterator[DnsServer]:
    records = {
        "api.example.test": ["192.0.2.10", "2001:db8::10"],
        "v4only.example.test": ["192.0.2.11"],
        "target.example.test": ["203.0.113.7", "2001:db8::7"],
    }
    cnames = {"www.example.test": "cdn.example.test", "cdn.example.test": "target.example.test"}
    with DnsServer(world, ttl=TTL, records=records, cnames=cnames) as srv:
        yield srv
        pid = srv.pid
    assert pid is not None and not _running(pid)


@pytest.fixture(params=["router", "sandbox"])
def client(request: pytest.FixtureRequest, world: World) -> str:
    return world.router if request.param == "router" else world.sandboxes[0].name


# --------------------------------------------------------------------------- answers
def test_a_and_aaaa_with_the_configured_ttl(server: DnsServer, client: str) -> None:
    a = resolve(client, server.address, "api.example.test", "A")
    aaaa = resolve(client, server.address, "api.example.test", "AAAA")
    assert addresses(a) == {"192.0.2.10"}
    assert addresses(aaaa) == {"2001:db8::10"}
    assert a.rrset is not None and a.rrset.ttl == TTL
    assert aaaa.rrset is not None and aaaa.rrset.ttl == TTL
    assert a.response.flags & dns.flags.AA  # dnsmasq answers its local names authoritatively


def test_over_ipv6_transport_and_tcp(server: DnsServer, client: str) -> None:
    assert server.address6 is not None
    for srv in (server.address, server.address6):
        for tcp in (False, True):
            assert addresses(resolve(client, srv, "api.example.test", "AAAA", tcp=tcp)) == {"2001:db8::10"}
            assert addresses(resolve(client, srv, "api.example.test", "A", tcp=tcp)) == {"192.0.2.10"}


def test_missing_family_is_nodata_and_unknown_name_is_nxdomain(server: DnsServer, client: str) -> None:
    with pytest.raises(dns.resolver.NoAnswer):
        resolve(client, server.address, "v4only.example.test", "AAAA")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(client, server.address, "nothing-here.example.test", "A")


def test_names_outside_test_are_refused_never_forwarded(server: DnsServer, world: World) -> None:
    reply = dns_query(world.router, server.address, "example.com", "A", timeout=LIFETIME)
    assert reply.rcode() == dns.rcode.REFUSED
    with pytest.raises(ValueError):
        server.set("example.com", "192.0.2.1")


def test_cname_chain_resolves_to_the_target(server: DnsServer, client: str) -> None:
    answer = resolve(client, server.address, "www.example.test", "A")
    assert addresses(answer) == {"203.0.113.7"}
    chain = [
        (str(r.name), str(r[0].target)) for r in answer.response.answer if r.rdtype == dns.rdatatype.CNAME
    ]
    assert chain == [
        ("www.example.test.", "cdn.example.test."),
        ("cdn.example.test.", "target.example.test."),
    ]
    assert {r.ttl for r in answer.response.answer} == {TTL}
    assert addresses(resolve(client, server.address, "www.example.test", "AAAA", tcp=True)) == {"2001:db8::7"}


# --------------------------------------------------------------------------- changes while running
def test_set_takes_effect_for_the_very_next_query(server: DnsServer, world: World) -> None:
    sb = world.sandboxes[0].name
    for i in range(10):
        v4, v6 = f"198.51.100.{100 + i}", f"2001:db8:1::{i + 1:x}"
        server.set("flip.example.test", v4, v6)
        assert addresses(resolve(sb, server.address, "flip.example.test", "A")) == {v4}
        assert addresses(resolve(world.router, server.address, "flip.example.test", "AAAA")) == {v6}
    server.set("flip.example.test", "192.0.2.1", "192.0.2.2", "192.0.2.3")
    assert addresses(resolve(sb, server.address, "flip.example.test")) == {
        "192.0.2.1",
        "192.0.2.2",
        "192.0.2.3",
    }
    with pytest.raises(dns.resolver.NoAnswer):  # the v6 address is gone: NODATA, not a stale answer
        resolve(sb, server.address, "flip.example.test", "AAAA")


def test_remove_gives_nxdomain(server: DnsServer, client: str) -> None:
    server.set("gone.example.test", "192.0.2.50")
    assert addresses(resolve(client, server.address, "gone.example.test")) == {"192.0.2.50"}
    server.remove("gone.example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(client, server.address, "gone.example.test")
    server.remove("gone.example.test")  # no-op


def test_cname_target_changes_without_restart_and_cname_changes_with_one(
    server: DnsServer, world: World
) -> None:
    sb = world.sandboxes[0].name
    pid = server.pid
    server.set("target.example.test", "203.0.113.8")
    assert addresses(resolve(sb, server.address, "www.example.test")) == {"203.0.113.8"}
    assert server.pid == pid  # SIGHUP, not a restart

    server.set("other.example.test", "192.0.2.77")
    server.cname("alias.example.test", "other.example.test")
    assert server.pid != pid  # dnsmasq reads --cname only at start
    assert addresses(resolve(sb, server.address, "alias.example.test")) == {"192.0.2.77"}
    server.remove("alias.example.test")
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(sb, server.address, "alias.example.test")
    server.set("target.example.test", "203.0.113.7", "2001:db8::7")  # back to the module's setup
    assert addresses(resolve(sb, server.address, "www.example.test")) == {"203.0.113.7"}


# --------------------------------------------------------------------------- counting
def test_counts_exactly_the_queries_sent(server: DnsServer, world: World) -> None:
    sb = world.sandboxes[0]
    server.set("count.example.test", "192.0.2.60")
    server.reset_counts()
    assert server.queries() == 0
    for _ in range(5):
        resolve(sb.name, server.address, "count.example.test", "A")
    assert server.queries("count.example.test") == 5
    assert server.queries("COUNT.example.test.", "a") == 5
    assert server.queries("count.example.test", "AAAA") == 0
    assert server.queries() == 5
    assert {q.source for q in server.query_log()} == {sb.addr4}

    with pytest.raises(dns.resolver.NoAnswer):  # NODATA: no v6 address for it
        resolve(world.router, server.address, "count.example.test", "AAAA", tcp=True)
    with pytest.raises(dns.resolver.NXDOMAIN):
        resolve(world.router, server.address, "nope.example.test")
    assert server.queries("count.example.test", "AAAA") == 1
    assert server.queries("nope.example.test") == 1
    assert server.queries() == 7

    # the fixture's own checks (set/remove/resume) are never counted
    server.set("count.example.test", "192.0.2.61")
    server.remove("count.example.test")
    assert server.queries() == 7
    server.reset_counts()
    assert server.queries() == 0


# --------------------------------------------------------------------------- outages
def test_pause_times_out_and_resume_answers_again(server: DnsServer, world: World) -> None:
    sb = world.sandboxes[0].name
    server.set("pause.example.test", "192.0.2.70")
    server.reset_counts()
    server.pause()
    try:
        assert server.paused
        for tcp in (False, True):
            t0 = time.monotonic()
            with pytest.raises(dns.exception.Timeout):
                resolve(sb, server.address, "pause.example.test", tcp=tcp, lifetime=0.5)
            assert time.monotonic() - t0 < 1.5
        server.set("pause.example.test", "192.0.2.71")  # takes effect once resumed
    finally:
        server.resume()
    assert not server.paused
    assert addresses(resolve(sb, server.address, "pause.example.test")) == {"192.0.2.71"}
    # queries the kernel queued during the pause were answered (late) and counted on resume
    assert server.queries("pause.example.test") >= 2


def test_lifecycle_kill_restart_and_idempotent_close(world: World) -> None:
    """A second server on other addresses: start, kill (crash), start again, pause, close twice."""
    srv = DnsServer(world, address="203.0.113.53", address6="2001:db8:53::54", ttl=TTL)
    with srv:
        srv.set("life.example.test", "192.0.2.80")
        assert srv.start_seconds is not None and srv.start_seconds < 2.0
        first = srv.pid
        assert first is not None
        srv.kill()
        assert not _running(first) and not srv.running
        with pytest.raises(dns.exception.Timeout):
            dns_query(world.router, srv.address, "life.example.test", timeout=0.3)
        srv.start()
        assert addresses(resolve(world.router, srv.address, "life.example.test")) == {"192.0.2.80"}
        srv.pause()
        second = srv.pid
        assert second is not None
    assert not _running(second)  # a paused dnsmasq still stops
    srv.close()
    links = subprocess.run(
        ["ip", "-n", world.inet, "-6", "addr", "show", "dev", "lo"], capture_output=True, text=True
    )
    assert "2001:db8:53::54" not in links.stdout
    assert srv.workdir is None
