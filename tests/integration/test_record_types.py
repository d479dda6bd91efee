"""Each record type of a host name on its own: an A or AAAA query refused, dropped or timing out never throws
away the other type's answer. Real DNS servers in the world's internet, real TCP through the sandboxes.

dnsmasq runs as a new user would run it: no upstream, names from an addn-hosts file, no zone of its own, so it
answers REFUSED to the record type a name lacks (the AAAA query of an IPv4-only name).
"""

import json
import subprocess
import sys

import pytest

from netns_fixtures import DnsServer
from netns_fixtures.scripted_dns import ScriptedDnsServer
from tests.integration.test_agent import closed_to, eventually, open_to

pytestmark = pytest.mark.root

DNS4 = "198.51.100.53"  # dnsmasq: REFUSED for any name or type it has no record of
DROPS_AAAA = "192.0.2.54"  # answers A, never answers AAAA
REFUSES = "192.0.2.55"  # refuses every query
A4, B4 = "198.51.100.10", "198.51.100.20"
A6, B6 = "2001:db8:1::10", "2001:db8:1::20"
V4ONLY, V6ONLY, BOTH = "v4only.example.test", "v6only.example.test", "both.example.test"


@pytest.fixture
def server(world):
    records = {V4ONLY: [A4], V6ONLY: [A6], BOTH: [A4, A6]}
    with DnsServer(world, address=DNS4, ttl=1, local_zone=False, records=records) as server:
        yield server


@pytest.fixture
def dns_agent(world, agent):
    def make(*nameservers, intercept=True):
        extra = f"[dns]\nnameservers = {json.dumps(list(nameservers))}\nmin_ttl = 0.5\nmax_ttl = 1\ntimeout = 0.5\n"
        extra += f"intercept = {json.dumps(intercept)}\n"
        return agent(netns=world.router, extra_config=extra).start()

    return make


def types_of(a, sid, name):
    """The per-type view of one host name, as `egressd status --json` prints it."""
    out = a.cli("status", "--json")
    assert out.returncode == 0, out.stderr
    (row,) = [s for s in json.loads(out.stdout)["sandboxes"] if s["id"] == sid]
    (host,) = [h for h in row["hostnames"] if h["name"] == name]
    return host["types"]


def test_the_server_refuses_the_missing_type(world, server):
    """The world as the issue found it: without this, the tests below would not test a refused type."""
    sb = world.sandboxes[0]
    assert server.query(sb.name, V4ONLY, "A").rcode() == 0
    assert server.query(sb.name, V4ONLY, "AAAA").rcode() == 5  # REFUSED
    assert server.query(sb.name, V6ONLY, "A").rcode() == 5


def test_ipv4_only_and_ipv6_only_names_are_allowed_with_internet_off(world, server, dns_agent):
    s0, s1 = world.sandboxes
    a = dns_agent(DNS4)
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=[V4ONLY])
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=False, allow_out=[V6ONLY])
    assert a.wait("s0", 1, timeout=5) and a.wait("s1", 1, timeout=5)
    assert open_to(s0.name, A4) and closed_to(s0.name, B4) and closed_to(s0.name, A6)
    assert open_to(s1.name, A6) and closed_to(s1.name, B6) and closed_to(s1.name, A4)
    v4 = types_of(a, "s0", V4ONLY)
    assert v4["A"]["state"] == "resolved" and v4["A"]["current"] == [A4] and v4["A"]["error"] is None
    assert v4["AAAA"]["error"] == f"no nameserver answered: REFUSED from {DNS4}"
    v6 = types_of(a, "s1", V6ONLY)
    assert v6["AAAA"]["current"] == [A6] and "REFUSED" in v6["A"]["error"]
    assert "AAAA: no nameserver answered: REFUSED" in a.cli("status").stdout


def test_ipv4_only_and_ipv6_only_names_are_denied_with_internet_on(world, server, dns_agent):
    s0, s1 = world.sandboxes
    a = dns_agent(DNS4)
    a.upsert("s0", s0.netns_path, 1, deny_out=[V4ONLY])
    a.upsert("s1", s1.netns_path, 1, deny_out=[V6ONLY])
    # released by the type that answered, long before the refused one could fail for good (about 15 s)
    assert a.wait("s0", 1, timeout=5) and a.wait("s1", 1, timeout=5)
    assert closed_to(s0.name, A4) and open_to(s0.name, B4) and open_to(s0.name, A6)
    assert closed_to(s1.name, A6) and open_to(s1.name, B6) and open_to(s1.name, A4)


def test_a_name_whose_aaaa_query_times_out_is_enforced_by_its_a_records(world, dns_agent):
    s0, s1 = world.sandboxes
    with ScriptedDnsServer(world.inet, DROPS_AAAA, {BOTH: [A4, A6]}, {"AAAA": "drop"}) as dropper:
        a = dns_agent(DROPS_AAAA)
        a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=[BOTH])
        a.upsert("s1", s1.netns_path, 1, deny_out=[BOTH])
        assert a.wait("s0", 1, timeout=5) and a.wait("s1", 1, timeout=5)
        assert open_to(s0.name, A4) and closed_to(s0.name, B4)
        assert closed_to(s1.name, A4) and open_to(s1.name, B4)
        assert eventually(lambda: (types_of(a, "s0", BOTH)["AAAA"]["error"] or "").startswith("timeout"))
        assert types_of(a, "s0", BOTH)["A"]["current"] == [A4]
        assert eventually(lambda: dropper.queries[BOTH, "AAAA"] >= 2)  # retried with backoff
        assert a.events("dns_failed") and all(e["type"] == "AAAA" for e in a.events("dns_failed"))


def test_a_refusing_nameserver_is_passed_over_for_the_next(world, server, dns_agent):
    sb = world.sandboxes[0]
    with ScriptedDnsServer(world.inet, REFUSES, {}, {"A": "refuse", "AAAA": "refuse"}) as refuser:
        a = dns_agent(REFUSES, DNS4)
        a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=[BOTH])
        assert a.wait("s0", 1, timeout=5)
        assert open_to(sb.name, A4) and open_to(sb.name, A6) and closed_to(sb.name, B4)
        assert refuser.queries[BOTH, "A"] >= 1 and refuser.queries[BOTH, "AAAA"] >= 1  # it was asked first
        types = types_of(a, "s0", BOTH)
        assert types["A"]["error"] is None and types["AAAA"]["error"] is None
        assert not a.events("dns_failed")


def test_explain_and_apply_judge_each_type_on_its_own(world, server, dns_agent, tmp_path):
    s0, s1 = world.sandboxes
    a = dns_agent(DNS4, intercept=False)  # `apply` writes tables without interception: the same shape
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=[V4ONLY])
    assert a.wait("s0", 1, timeout=5)
    out = a.cli("explain", "s0", V4ONLY)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"{A4}: accept: allow_out entry {V4ONLY}")
    assert f"note: {V4ONLY} AAAA: no nameserver answered: REFUSED from {DNS4}" in out.stderr
    a.stop()  # the tables stay; `apply` now rewrites them without an agent
    records = [
        {"id": "c0", "netns": s0.netns_path, "network_policy": {"allow_internet_access": False, "allow_out": [V6ONLY]}},
        {"id": "c1", "netns": s1.netns_path, "network_policy": {"deny_out": [V4ONLY]}},
    ]  # fmt: skip
    (tmp_path / "records.json").write_text(json.dumps(records))
    config = tmp_path / "apply.toml"
    config.write_text(f'[dns]\nnameservers = ["{DNS4}"]\ntimeout = 0.5\n')
    argv = ["ip", "netns", "exec", world.router, sys.executable, "-m", "egressd", "apply"]
    out = subprocess.run([*argv, "--config", str(config), str(tmp_path / "records.json")],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    assert out.returncode == 0, out.stderr
    # c0's table had the same shape (one allowed name, internet off), but another name is another policy:
    # a new generation (ruleset/generation.py), so the open connections are judged again
    assert f"c0: applied in {s0.netns_path}\n" in out.stdout
    assert f"c1: applied in {s1.netns_path}\n" in out.stdout
    assert f"c0:   {V6ONLY}: {A6} (A: no nameserver answered: REFUSED from {DNS4})" in out.stdout
    assert open_to(s0.name, A6) and closed_to(s0.name, B6) and closed_to(s0.name, A4)
    assert closed_to(s1.name, A4) and open_to(s1.name, B4) and open_to(s1.name, A6)
