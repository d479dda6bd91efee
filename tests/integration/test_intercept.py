"""DNS interception, end to end: the sandbox resolves with its own resolver (getaddrinfo, a resolv.conf naming
an address where nothing listens), egressd answers every query, and host-name policy holds for whatever
address the sandbox was given. The upstream answers like a CDN: one address of 50 at random per query.
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from netns_fixtures.pool_dns import PoolDnsServer
from netns_fixtures.probe import tcp_connect
from tests.integration.test_agent import closed_to, eventually, open_to
from tests.loopback import free_port, scrape

pytestmark = pytest.mark.root

UPSTREAM = "192.0.2.153"
NOWHERE = "203.0.113.253"  # the sandbox's resolv.conf names it; nothing listens there
POOL = [f"198.51.100.{i}" for i in range(100, 150)]  # 50 addresses, like a CDN's slice
POOL6 = [f"2001:db8:cd::{i:x}" for i in range(100, 150)]
ZONES = {
    "pool.example.test": POOL + POOL6,
    "www.example.test": {"cname": "pool.example.test"},
    "deep.api.wild.test": POOL,
    "api.wild.test": POOL,
    "wild.test": POOL,
    "sneaky.example.test": {"cname": "x.evil.test"},
    "x.evil.test": ["203.0.113.66"],
    "meta.example.test": {"many": ["169.254.169.254", "198.51.100.77"]},  # both in every answer
    "many.example.test": {"many": [f"203.0.113.{i}" for i in range(10, 50)]},  # 40 addresses: over 512 bytes
}

RESOLVE = """
import json, socket, sys
try:
    infos = socket.getaddrinfo(sys.argv[1], 80, int(sys.argv[2]), socket.SOCK_STREAM)
    print(json.dumps(sorted({i[4][0] for i in infos})))
except socket.gaierror as e:
    print(json.dumps({"error": e.errno}))
"""

ASK = """
import json, sys
import dns.message, dns.query, dns.rcode
name, rdtype, server, transport = sys.argv[1:5]
q = dns.message.make_query(name, rdtype)
try:
    r = (dns.query.tcp if transport == "tcp" else dns.query.udp)(q, server, timeout=2)
    print(json.dumps({"rcode": dns.rcode.to_text(r.rcode()), "answer": [str(x) for x in r.answer]}))
except Exception as e:
    print(json.dumps({"error": repr(e)}))
"""


@pytest.fixture
def upstream(world):
    with PoolDnsServer(world.inet, UPSTREAM, ZONES, ttl=30) as server:
        yield server


@pytest.fixture
def resolv(world):
    """Each sandbox's resolv.conf (what `ip netns exec` mounts) names an address where nothing listens."""
    made = []
    for sb in world.sandboxes:
        d = Path("/etc/netns") / sb.name
        d.mkdir(parents=True, exist_ok=True)
        (d / "resolv.conf").write_text(f"nameserver {NOWHERE}\noptions timeout:2 attempts:1\n")
        made.append(d)
    yield
    for d in made:
        (d / "resolv.conf").unlink(missing_ok=True)
        d.rmdir()


@pytest.fixture
def intercepting(world, agent, upstream, resolv):
    extra = (
        f'[dns]\nintercept = true\nnameservers = ["{UPSTREAM}"]\nmin_ttl = 5\nmax_ttl = 30\nretention = 0\n'
    )
    return agent(netns=world.router, extra_config=extra).start()


def _in(ns, script, *args):
    out = subprocess.run(
        ["ip", "netns", "exec", ns, sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def resolve(ns, name, family=2):  # 2: AF_INET, 10: AF_INET6
    return _in(ns, RESOLVE, name, str(family))


def ask(ns, name, rdtype="A", server=NOWHERE, transport="udp"):
    return _in(ns, ASK, name, rdtype, server, transport)


def test_whatever_address_the_cdn_gives_the_sandbox_it_can_reach_at_once(world, upstream, intercepting):
    sb = world.sandboxes[0]
    a = intercepting
    a.upsert(
        "s0",
        sb.netns_path,
        1,
        allow_internet_access=False,
        allow_out=["pool.example.test", "www.example.test"],
    )
    assert a.wait("s0", 1, timeout=10)
    # The table is in force: nothing learned yet. The agent resolves the exact names itself (one address of
    # the pool each); any address nobody was given is closed.
    unasked = [
        p
        for p in POOL
        if not any(upstream.answered[(n, p)] for n in ("pool.example.test", "www.example.test"))
    ]
    assert closed_to(sb.name, unasked[0])
    given = set()
    for _ in range(6):
        (addr,) = resolve(sb.name, "pool.example.test")
        assert addr in POOL
        assert open_to(sb.name, addr)  # right after the answer: the first packet passes
        given.add(addr)
    assert len(given) >= 2  # the CDN did answer differently
    never = next(
        p
        for p in POOL
        if not any(upstream.answered[(n, p)] for n in ("pool.example.test", "www.example.test"))
    )
    assert closed_to(sb.name, never)
    assert a.cli("explain", "s0", never).returncode == 1  # explain agrees: denied
    (addr6,) = resolve(sb.name, "www.example.test", 10)  # through a CNAME, IPv6
    assert addr6 in POOL6 and open_to(sb.name, addr6)
    (row,) = json.loads(a.cli("status", "--json").stdout)["sandboxes"]
    learned = {x["address"]: x["names"] for x in row["dns_proxy"]["addresses"]}
    assert row["dns_proxy"]["learned"] == len(given) + 1 and learned[addr6] == ["www.example.test"]
    assert all(learned[g] == ["pool.example.test"] for g in given)
    assert "dns proxy" in a.cli("status").stdout
    by_dns = json.loads(a.cli("status", "--dns", "--json").stdout)["learned"]["s0"]  # the same, by --dns
    assert {x["address"]: x["names"] for x in by_dns["addresses"]} == learned
    text = a.cli("status", "--dns").stdout
    assert "learned from the sandboxes' own DNS answers" in text and addr6 in text


def test_names_the_policy_does_not_allow_never_reach_the_upstream(world, upstream, intercepting):
    sb = world.sandboxes[0]
    a = intercepting
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["pool.example.test"])
    assert a.wait("s0", 1, timeout=10)
    secret = [f"c2VjcmV0{i}.exfil.test" for i in range(4)]
    assert resolve(sb.name, secret[0]) == {"error": -3}  # EAI_AGAIN: REFUSED
    for name, server, transport, rdtype in (
        (secret[1], "203.0.113.77", "udp", "TXT"),
        (secret[2], "2001:db8:ffff::53", "tcp", "A"),
        (secret[3], UPSTREAM, "udp", "AAAA"),  # even to the upstream's own address
    ):
        assert ask(sb.name, name, rdtype, server, transport)["rcode"] == "REFUSED"
    assert ask(sb.name, "pool.example.test", "A", "203.0.113.77", "tcp")["rcode"] == "NOERROR"
    assert not any(n.endswith("exfil.test") for n in upstream.names_seen())
    assert "pool.example.test" in upstream.names_seen()  # the control: allowed names do get there


def test_patterns_at_any_depth_never_the_apex_and_deny_through_a_cname(world, upstream, intercepting):
    sb = world.sandboxes[0]
    a = intercepting
    a.upsert(
        "s0",
        sb.netns_path,
        1,
        allow_internet_access=False,
        allow_out=["*.wild.test", "*.example.test"],
        deny_out=["*.evil.test"],
    )
    assert a.wait("s0", 1, timeout=10)
    for name in ("api.wild.test", "deep.api.wild.test"):
        (addr,) = resolve(sb.name, name)
        assert open_to(sb.name, addr), name
    out = a.cli("explain", "s0", addr)  # the last one: learned from deep.api.wild.test's answer
    assert out.returncode == 0 and out.stdout.startswith(
        "accept: allow_out *.wild.test via deep.api.wild.test, learned"
    )
    out = a.cli("explain", "s0", "wild.test")
    assert "the sandbox's own DNS query gets refused" in out.stderr  # the apex
    assert ask(sb.name, "wild.test")["rcode"] == "REFUSED"  # the apex is not under *.wild.test
    assert ask(sb.name, "sneaky.example.test")["rcode"] == "NXDOMAIN"  # its CNAME leads into *.evil.test
    assert ask(sb.name, "x.evil.test")["rcode"] == "NXDOMAIN"
    assert closed_to(sb.name, "203.0.113.66")
    meta = ask(sb.name, "meta.example.test")  # rebinding to the metadata address: stripped
    assert meta["rcode"] == "NOERROR" and "169.254.169.254" not in json.dumps(meta["answer"])
    assert "198.51.100.77" in json.dumps(meta["answer"])
    # every refusal is a denial event, with the query name, the step and the entry (docs/denials.md)
    want = [
        {"kind": "dns", "name": "wild.test", "step": "internet"},
        {"kind": "dns", "name": "x.evil.test", "step": "deny_out", "entry": "*.evil.test"},
        {"kind": "dns", "name": "sneaky.example.test", "step": "deny_out", "entry": "*.evil.test"},
        {"kind": "packet", "dst": "203.0.113.66", "step": "internet", "proto": "tcp"},
    ]

    def events():
        out = a.cli("denials", "s0", "--json")
        return [json.loads(line) for line in out.stdout.splitlines()]

    def shown(w):
        return any(all(e.get(k) == v for k, v in w.items()) for e in events())

    assert all(eventually(lambda w=w: shown(w), timeout=5.0) for w in want), events()
    assert not any(e.get("name") in ("api.wild.test", "deep.api.wild.test") for e in events())  # allowed


def test_a_sandbox_without_host_names_is_not_intercepted(world, upstream, intercepting):
    s0, s1 = world.sandboxes
    a = intercepting
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=True, deny_out=["203.0.113.0/24"])
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=True, allow_out=["pool.example.test"])
    assert a.wait("s0", 1, timeout=10) and a.wait("s1", 1, timeout=10)
    # s0 asks the upstream itself, directly; s1's question to the same server is answered by egressd
    direct = ask(s0.name, "pool.example.test", "A", UPSTREAM)
    assert direct["rcode"] == "NOERROR"
    assert ask(s0.name, "pool.example.test", "A", NOWHERE)["error"]  # nothing listens there: a timeout
    assert ask(s1.name, "pool.example.test", "A", NOWHERE)["rcode"] == "NOERROR"
    addr = random.choice(POOL)
    assert open_to(s1.name, addr)  # internet on: every address is open anyway


def test_an_answer_too_big_for_udp_comes_over_tcp_and_every_address_is_learned(world, upstream, intercepting):
    sb = world.sandboxes[0]
    a = intercepting
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["many.example.test"])
    assert a.wait("s0", 1, timeout=10)
    udp = ask(sb.name, "many.example.test")  # dnspython without EDNS: 512 bytes at most
    assert udp.get("rcode") == "NOERROR" and udp["answer"] == []  # truncated: TC, no records
    tcp = ask(sb.name, "many.example.test", transport="tcp")
    assert len(tcp["answer"][0].split("\n")) == 40
    addrs = resolve(sb.name, "many.example.test")  # glibc: UDP, truncated, then TCP
    assert len(addrs) == 40
    assert open_to(sb.name, addrs[0]) and open_to(sb.name, addrs[-1])


def test_learned_addresses_outlive_the_agent_and_its_restart(world, upstream, intercepting):
    sb = world.sandboxes[0]
    a = intercepting
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["pool.example.test"])
    assert a.wait("s0", 1, timeout=10)
    (addr,) = resolve(sb.name, "pool.example.test")
    assert a.stop() == 0
    assert open_to(sb.name, addr)  # enforcement, learned addresses included, outlives the agent
    assert "error" in ask(sb.name, "pool.example.test")  # nobody answers while it is down: a timeout
    a.start()  # READY only once every proxy listens again
    assert open_to(sb.name, addr)
    (row,) = json.loads(a.cli("status", "--json").stdout)["sandboxes"]
    assert [x["address"] for x in row["dns_proxy"]["addresses"]] == [addr]  # taken from the kernel
    (again,) = resolve(sb.name, "pool.example.test")
    assert open_to(sb.name, again) and closed_to(sb.name, "203.0.113.66")


OLD_FLOW = """
import json, socket, sys
import dns.message
name, server = sys.argv[1:3]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 40053))  # the same flow (5-tuple) each time
s.settimeout(1.5)
try:
    s.sendto(dns.message.make_query(name, "A").to_wire(), (server, 53))
    r = dns.message.from_wire(s.recv(4096))
    print(json.dumps({"rcode": r.rcode()}))
except OSError as e:
    print(json.dumps({"error": repr(e)}))
"""


def test_a_dns_flow_open_before_interception_cannot_go_around_it(world, upstream, agent, resolv):
    """NAT is decided once per flow: a UDP flow to port 53 that conntrack set up while the sandbox's table
    had no redirect (its policy named no host) would still reach its server once the policy names one. Such
    packets are denied; a new flow is answered by the proxy."""
    sb = world.sandboxes[0]
    extra = f'[dns]\nintercept = true\nnameservers = ["{UPSTREAM}"]\n'
    a = agent(netns=world.router, extra_config=extra).start()
    a.upsert("s0", sb.netns_path, 1, allow_internet_access=True)
    assert a.wait("s0", 1, timeout=10)
    assert _in(sb.name, OLD_FLOW, "pool.example.test", UPSTREAM) == {"rcode": 0}  # not intercepted: direct
    # internet stays on: only the port-53 rule stands between the old flow and the upstream
    a.upsert("s0", sb.netns_path, 2, allow_internet_access=True, deny_out=["*.evil.test"])
    assert a.wait("s0", 2, timeout=10)
    upstream.reset_counts()
    stale = _in(sb.name, OLD_FLOW, "x.evil.test", UPSTREAM)  # the old flow: denied
    assert "error" in stale and upstream.names_seen() == set()
    assert ask(sb.name, "x.evil.test", "A", UPSTREAM)["rcode"] == "NXDOMAIN"  # a new flow: the proxy
    assert upstream.names_seen() == set()
    assert ask(sb.name, "pool.example.test", "A", UPSTREAM)["rcode"] == "NOERROR"  # forwarded: internet on


HOLD = """
import socket, sys
s = socket.create_connection((sys.argv[1], 80), timeout=2)
for line in sys.stdin:
    tag = line.strip().encode()
    try:
        s.sendall(tag + b"\\n")
        print("ok" if s.recv(100).startswith(tag) else "bad", flush=True)
    except OSError:
        print("cut", flush=True)
"""


def test_an_open_connection_outlives_its_learned_address_until_the_policy_changes(
    world, upstream, agent, resolv
):
    """A learned address that expires denies new connections, not the ones opened while it was allowed
    (a connection mark carrying the policy's generation); a policy change cuts them."""
    sb = world.sandboxes[0]
    extra = (
        f'[dns]\nintercept = true\nnameservers = ["{UPSTREAM}"]\nmin_ttl = 1\nmax_ttl = 2\nretention = 0\n'
    )
    a = agent(netns=world.router, extra_config=extra).start()
    a.upsert(
        "s0", sb.netns_path, 1, allow_internet_access=False, allow_out=["*.example.test"]
    )  # no exact name
    assert a.wait("s0", 1, timeout=10)
    (addr,) = resolve(sb.name, "pool.example.test")  # learned for 2 s
    hold = subprocess.Popen(
        ["ip", "netns", "exec", sb.name, sys.executable, "-c", HOLD, addr],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def echo(tag):
        hold.stdin.write(tag + "\n")
        hold.stdin.flush()
        return hold.stdout.readline().strip()

    try:
        assert echo("a") == "ok"
        time.sleep(3.5)  # the address has left the learned set
        assert tcp_connect(sb.name, addr, 80) == "reset"  # a new connection: denied
        assert echo("b") == "ok"  # the open one: still carried
        a.upsert(
            "s0", sb.netns_path, 2, allow_internet_access=False, allow_out=["*.example.test", "192.0.2.1"]
        )
        assert a.wait("s0", 2, timeout=10)
        assert echo("c") == "cut"  # a new policy judges it again: its address is not allowed any more
    finally:
        hold.kill()
        hold.wait(timeout=5)


FLOOD = """
import socket, sys, time
import dns.message
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setblocking(False)
wire = dns.message.make_query("flood.exfil.test", "A").to_wire()
end = time.monotonic() + float(sys.argv[1])
sent = 0
while time.monotonic() < end:
    try:
        s.sendto(wire, ("203.0.113.77", 53))
        sent += 1
    except BlockingIOError:
        time.sleep(0.0005)
print(sent)
"""


def test_a_flooding_sandbox_does_not_slow_a_quiet_one(world, upstream, agent, resolv):
    s0, s1 = world.sandboxes
    port = free_port()
    extra = f'[dns]\nintercept = true\nnameservers = ["{UPSTREAM}"]\n[metrics]\nlisten = "127.0.0.1:{port}"\n'
    a = agent(netns=world.router, extra_config=extra).start()
    a.upsert("s0", s0.netns_path, 1, allow_internet_access=False, allow_out=["pool.example.test"])
    a.upsert("s1", s1.netns_path, 1, allow_internet_access=False, allow_out=["pool.example.test"])
    assert a.wait("s0", 1, timeout=10) and a.wait("s1", 1, timeout=10)
    flood = subprocess.Popen(
        ["ip", "netns", "exec", s0.name, sys.executable, "-c", FLOOD, "4"], stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(1)  # the flood is on
        for _ in range(5):
            t0 = time.monotonic()
            (addr,) = resolve(s1.name, "pool.example.test")
            assert time.monotonic() - t0 < 1.0 and open_to(s1.name, addr)  # includes starting Python
    finally:
        sent = int(flood.communicate(timeout=30)[0])
    assert sent > 2000  # it did flood (the proxy's rate limit is 200 per second by default)
    m = scrape(port, world.router)
    limited = m[("egressd_dns_proxy_queries_total", (("outcome", "rate_limited"),))]
    refused = m[("egressd_dns_proxy_queries_total", (("outcome", "refused"),))]
    assert limited > 0 and refused <= 200 * 6  # at most the rate was answered; the rest were dropped
    assert "flood.exfil.test" not in upstream.names_seen()
