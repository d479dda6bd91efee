"""`egressd explain` against a running agent: every step of the semantics, both families, bad input, a host
name resolved through a real DNS server; the kernel is probed for the same destinations."""

import json

import pytest

from netns_fixtures import DnsServer
from tests.integration.test_agent import BAD4, BAD6, OK4, OK6, closed_to, open_to

pytestmark = pytest.mark.root

DNS4 = "198.51.100.53"


def explain(a, *args):
    out = a.cli("explain", *args)
    return out.returncode, out.stdout.strip(), out.stderr.strip()


def test_explain_each_step_in_both_families(world, agent):
    s0, s1 = world.sandboxes
    a = agent().start()
    a.upsert(
        "s0", s0.netns_path, 1, allow_internet_access=False, allow_out=["198.51.100.0/24", "2001:db8:1::/48"]
    )
    a.upsert("s1", s1.netns_path, 1, deny_out=[BAD4, "2001:db8:bad::/48"])
    assert a.wait("s0", 1) and a.wait("s1", 1)

    cases = [
        ("s0", OK4, 0, "accept: allow_out 198.51.100.0/24"),
        ("s0", OK6, 0, "accept: allow_out 2001:db8:1::/48"),
        ("s0", BAD4, 1, "deny: allow_internet_access=false and no list entry matches"),
        ("s0", BAD6, 1, "deny: allow_internet_access=false and no list entry matches"),
        ("s0", "169.254.169.254", 1, "deny: guard.deny 169.254.0.0/16"),
        ("s0", "fd00:ec2::254", 1, "deny: guard.deny fd00:ec2::254/128"),
        ("s1", BAD4, 1, f"deny: deny_out {BAD4}/32"),
        ("s1", BAD6, 1, "deny: deny_out 2001:db8:bad::/48"),
        ("s1", OK4, 0, "accept: allow_internet_access=true and no list entry matches"),
        ("s1", OK6, 0, "accept: allow_internet_access=true and no list entry matches"),
        ("s1", "10.1.2.3", 1, "deny: guard.private 10.0.0.0/8"),
    ]
    for sid, dest, code, text in cases:
        assert explain(a, sid, dest)[:2] == (code, text), (sid, dest)
    # The kernel agrees where the world can answer.
    assert open_to(s0.name, OK4) and closed_to(s0.name, BAD4)
    assert closed_to(s1.name, BAD4) and open_to(s1.name, OK6)

    code, out, _ = explain(a, "s1", BAD6, "--json")
    doc = json.loads(out)
    assert code == 1 and doc["state"] == "enforced" and doc["revision"] == 1
    assert doc["results"] == [
        {
            "address": BAD6,
            "action": "deny",
            "step": "deny_out",
            "entry": "2001:db8:bad::/48",
            "host": False,
            "text": "deny: deny_out 2001:db8:bad::/48",
        }
    ]


def test_explain_refuses_what_it_cannot_judge(world, agent):
    s0 = world.sandboxes[0]
    a = agent().start()
    a.upsert("s0", s0.netns_path, 1)
    assert a.wait("s0", 1)
    code, out, err = explain(a, "s0", "198.51.100.0/24")
    assert code == 2 and out == ""
    assert "198.51.100.0/24 is a network; explain judges one destination: give one address in it" in err
    code, _, err = explain(a, "s0", "198.51.100.7:443")
    assert code == 2 and "looks like host:port" in err
    code, _, err = explain(a, "ghost", OK4)
    assert code == 2 and "no sandbox 'ghost' is known to the agent; `egressd status` lists them" in err


@pytest.fixture
def server(world):
    with DnsServer(world, address=DNS4, ttl=30) as server:
        yield server


def test_explain_a_host_name_resolved_by_the_agent(world, agent, server):
    s0 = world.sandboxes[0]
    server.set("api.example.test", OK4, OK6)
    server.set("mirror.example.test", OK4, BAD4)
    a = agent(netns=world.router, extra_config=f'[dns]\nnameservers = ["{DNS4}"]\ntimeout = 1\n').start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=["api.example.test"])
    assert a.wait("s0", 1)

    code, out, _ = explain(a, "s0", "api.example.test")
    lines = out.splitlines()
    assert code == 0 and len(lines) == 2, out
    assert lines[0].startswith(f"{OK4}: accept: allow_out entry api.example.test ({OK4}, resolved ")
    assert lines[1].startswith(f"{OK6}: accept: allow_out entry api.example.test ({OK6}, resolved ")
    assert open_to(s0.name, OK4) and open_to(s0.name, OK6)

    code, out, _ = explain(a, "s0", "mirror.example.test")
    assert code == 1
    assert out.splitlines() == [
        f"{OK4}: accept: allow_out entry api.example.test ({OK4}, resolved "
        + out.splitlines()[0].split(", resolved ", 1)[1],
        f"{BAD4}: deny: allow_internet_access=false and no list entry matches",
    ]
    assert closed_to(s0.name, BAD4)

    code, _, err = explain(a, "s0", "nothing.example.test")
    assert code == 2 and "cannot resolve it: NXDOMAIN" in err
