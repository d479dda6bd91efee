"""Hostname entries end to end: a real DNS server (dnsmasq) whose answers change while real traffic flows.

The agent runs inside the world's router namespace (the world's "host"), so it resolves through the world's
network and never through the machine's own.
"""

import subprocess
import sys
import time
from pathlib import Path

import dns.exception
import pytest

from netns_fixtures import DnsServer, dns_query
from netns_fixtures.probe import ping, tcp_connect, udp_echo
from tests.integration.conftest import live_name, nft_table
from tests.integration.test_agent import closed_to, eventually, open_to

pytestmark = pytest.mark.root

DNS4 = "198.51.100.53"
A4, B4, C4 = "198.51.100.10", "198.51.100.20", "203.0.113.30"
A6, B6 = "2001:db8:1::10", "2001:db8:1::20"
METADATA = "169.254.169.254"
RETENTION = 1.5


@pytest.fixture
def server(world):
    with DnsServer(world, address=DNS4, ttl=1) as server:
        yield server


@pytest.fixture
def dns_agent(world, agent):
    """Agents in the world's router namespace, resolving through the world's DNS server."""

    def make(**kw):
        extra = (
            f'[dns]\nnameservers = ["{DNS4}"]\nmin_ttl = 0.5\nmax_ttl = 1\nretention = {RETENTION}\n'
            f'timeout = 0.5\nsandbox_resolvers = ["{DNS4}"]\n' + kw.pop("extra_config", "")
        )
        return agent(netns=world.router, extra_config=extra, **kw)

    return make


def hostnames(a, sid):
    return {h["name"]: h for h in a.status()[sid].get("hostnames", [])}


def test_allow_follows_dns_in_both_families(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("api.example.test", A4, A6)
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["api.example.test"])
    assert a.wait("s0", 1)
    assert open_to(sb.name, A4) and open_to(sb.name, A6)
    assert closed_to(sb.name, B4) and closed_to(sb.name, B6)
    server.set("api.example.test", B4, B6)
    assert eventually(lambda: open_to(sb.name, B4) and open_to(sb.name, B6), timeout=5)
    assert open_to(sb.name, A4)  # retained for a while: the sandbox may still hold the old answer
    assert eventually(lambda: closed_to(sb.name, A4) and closed_to(sb.name, A6), timeout=5)
    assert a.events("dns_updated") and a.status()["s0"]["writes"] >= 3
    assert len(a.events("applied")) == 1, "a DNS change must not rewrite the table"


def test_deny_follows_dns(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("bad.example.test", A4, A6)
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, deny_out=["bad.example.test"])
    assert a.wait("s0", 1)
    assert closed_to(sb.name, A4) and closed_to(sb.name, A6) and open_to(sb.name, B4)
    server.set("bad.example.test", B4)
    assert eventually(lambda: closed_to(sb.name, B4), timeout=5)
    assert eventually(lambda: open_to(sb.name, A4) and open_to(sb.name, A6), timeout=5)


def test_many_sandboxes_sharing_a_name_cost_one_query_per_refresh(world, server, dns_agent):
    extra = [f"{world.prefix}x{i}" for i in range(20)]
    for name in extra:
        subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        server.set("shared.example.test", A4, A6)
        a = dns_agent().start()
        for i, name in enumerate(extra):
            a.upsert(
                f"x{i}",
                f"/run/netns/{name}",
                1,
                allow_internet_access=False,
                allow_out=["shared.example.test"],
            )
        assert all(a.wait(f"x{i}", 1) for i in range(len(extra)))
        server.reset_counts()
        time.sleep(3.0)
        queries = server.queries("shared.example.test", "A")
        # TTL 1 s, refreshed at 90-100 % of it: 3 to 4 queries in 3 s, whatever the number of sandboxes
        assert 2 <= queries <= 5, queries
        assert server.queries("shared.example.test", "AAAA") == pytest.approx(queries, abs=1)
    finally:
        a.stop()
        for name in extra:
            subprocess.run(["ip", "netns", "del", name], check=False)


def test_nxdomain_is_reported_and_allows_nothing(world, server, dns_agent):
    sb = world.sandboxes[0]
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["nope.example.test"])
    a.upsert("s1", world.sandboxes[1].netns_path, 1, deny_out=["nope.example.test"])
    assert a.wait("s0", 1) and a.wait("s1", 1)  # NXDOMAIN settles the name: not held closed
    assert closed_to(sb.name, A4)
    assert nft_table(world.sandboxes[1].name) is not None and open_to(world.sandboxes[1].name, A4)
    assert hostnames(a, "s0")["nope.example.test"]["error"] == "NXDOMAIN: no such name"
    assert a.events("dns_nxdomain")


def test_when_the_server_is_down_the_last_addresses_stay(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("api.example.test", A4, A6)
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["api.example.test"])
    assert a.wait("s0", 1)
    server.pause()
    try:
        assert eventually(
            lambda: (hostnames(a, "s0")["api.example.test"]["error"] or "").startswith("timeout"), 5
        )
        time.sleep(RETENTION + 1)  # past retention: still kept, the resolver is failing
        assert open_to(sb.name, A4) and open_to(sb.name, A6) and closed_to(sb.name, B4)
        assert hostnames(a, "s0")["api.example.test"]["state"] == "failing"
    finally:
        server.resume()
    assert eventually(lambda: hostnames(a, "s0")["api.example.test"]["error"] is None, 5)


def test_a_name_answering_the_metadata_address_is_never_reachable(world, server, dns_agent):
    sb = world.sandboxes[0]
    world.exec(world.router, ["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"])
    # A TCP echo server there: a closed port would give "reset" too, so without egressd TCP must be "open".
    echo = subprocess.Popen(
        ["ip", "netns", "exec", world.router, sys.executable, "-m", "netns_fixtures.server", "--tcp", "80"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    try:
        assert echo.stdout.readline() == b"READY\n"
        assert ping(sb.name, METADATA) and tcp_connect(sb.name, METADATA, 80) == "open"  # without egressd
        server.set("meta.example.test", METADATA, A4)
        a = dns_agent().start()
        a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["meta.example.test"])
        assert a.wait("s0", 1)
        assert open_to(sb.name, A4)
        assert tcp_connect(sb.name, METADATA, 80) == "reset"  # egressd's own: the port is open
        assert not ping(sb.name, METADATA)
        sets = world.exec(
            sb.name, ["nft", "list", "set", "inet", "egressd", live_name(sb.name, "allow_dns4")]
        ).stdout
        assert METADATA not in sets and A4 in sets
    finally:
        echo.stdin.close()  # the server exits at EOF
        echo.wait(10)
        world.exec(world.router, ["ip", "addr", "del", f"{METADATA}/32", "dev", "lo"], check=False)


def test_a_new_sandbox_with_a_deny_name_is_closed_until_it_resolves(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("bad.example.test", C4)
    a = dns_agent().start()
    server.pause()
    try:
        a.upsert("s0", sb.netns_path, 1, deny_out=["bad.example.test"])
        closed = "closed until deny_out hosts resolve: bad.example.test"
        assert eventually(lambda: closed in (a.status().get("s0", {}).get("error") or ""), 5)
        assert a.status()["s0"]["state"] == "pending"
        assert closed_to(sb.name, A4) and closed_to(sb.name, A6)
        assert not a.wait("s0", 1, timeout=0.3)
    finally:
        server.resume()
    assert a.wait("s0", 1, timeout=10)
    assert open_to(sb.name, A4) and closed_to(sb.name, C4)


def test_a_cname_chain_is_followed(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("real.example.test", A4, A6)
    server.cname("alias.example.test", "real.example.test")
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["alias.example.test"])
    assert a.wait("s0", 1)
    assert open_to(sb.name, A4) and open_to(sb.name, A6) and closed_to(sb.name, B4)


def test_a_closed_sandbox_with_allow_names_may_use_the_resolvers_and_nothing_else(world, server, dns_agent):
    """Without interception ([dns] intercept = false): the sandbox_resolvers exception."""
    s0, s1 = world.sandboxes
    server.set("api.example.test", A4)
    a = dns_agent(extra_config="intercept = false\n").start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=["api.example.test"])
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=False, allow_out=[A4])
    assert a.wait("s0", 1) and a.wait("s1", 1)
    for tcp in (False, True):
        answer = dns_query(s0.name, DNS4, "api.example.test", "A", tcp=tcp, timeout=1)
        assert answer is not None and A4 in str(answer)
        with pytest.raises((OSError, dns.exception.Timeout)):  # refused or unanswered: no DNS for s1
            dns_query(s1.name, DNS4, "api.example.test", "A", tcp=tcp, timeout=1)
    assert tcp_connect(s0.name, DNS4, 80) == "reset"  # only port 53
    assert udp_echo(s0.name, "198.51.100.54", 53) == "unreachable"  # only the configured resolvers


def test_status_shows_hostnames_and_the_cache(world, server, dns_agent):
    sb = world.sandboxes[0]
    server.set("api.example.test", A4, A6)
    a = dns_agent().start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["api.example.test"])
    assert a.wait("s0", 1)
    h = hostnames(a, "s0")["api.example.test"]
    assert h["list"] == "allow_out" and h["addresses"] == [A4, A6] and 0 <= h["refresh_in"] <= 1
    out = a.cli("status", "--dns").stdout
    assert "api.example.test" in out and "resolved" in out and A4 in out
    table = a.cli("status").stdout
    assert "allow_out api.example.test" in table
