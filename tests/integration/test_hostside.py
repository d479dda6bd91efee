"""The host-side table: the same decision a second time, in the agent's own namespace, on what arrives from
a sandbox's link. Packet sockets in the sandbox go below its own table's hooks; they do not get past this.

The agent runs in the world's router namespace (the world's "host"); each sandbox's `host_interface` is the
router end of its veth.
"""

import json
import subprocess
import sys
import time

import pytest

from egressd.kernel.hostside import GUARD_TABLE, table_name
from netns_fixtures.probe import Sniffer, l3, ping, scapy_send, tcp_connect, udp_echo
from netns_fixtures.world import SANDBOX_TCP_PORT
from tests.integration.conftest import nft_table
from tests.integration.test_monitor import as_written

pytestmark = pytest.mark.root

ALLOWED4, DENIED4 = "198.51.100.10", "203.0.113.9"
ALLOWED6, DENIED6 = "2001:db8:1::10", "2001:db8:bad::9"
CLOSED = {"allow_internet_access": False, "allow_out": [ALLOWED4, ALLOWED6]}
METADATA4, METADATA6 = "169.254.169.254", "fd00:ec2::254"  # in egressd's default [guard] deny


@pytest.fixture
def host_agent(world, agent):
    def make(**kw):
        return agent(netns=world.router, **kw)

    return make


def upsert(a, sid, sb, revision, netns=True, host=True, **policy):
    record = {"id": sid, "revision": revision, "network_policy": policy}
    if netns:
        record["netns"] = sb.netns_path
    if host:
        record["host_interface"] = sb.host_if
    a.send({"type": "upsert", "sandbox": record})


def host_tables(world):
    """The host-side tables in the agent's namespace, read with the nft CLI."""
    out = world.exec(world.router, ["nft", "-j", "list", "tables", "netdev"], check=False)
    assert out.returncode == 0, out.stderr
    return {i["table"]["name"] for i in json.loads(out.stdout)["nftables"] if "table" in i}


def handle(world, iface):
    tables = nft_table(world.router, "netdev", table_name(iface))
    assert tables is not None, f"no host-side table for {iface}"
    return next(i["table"]["handle"] for i in tables if "table" in i)


def guard_drops(world):
    """Packets the guard table's last rule (marked, not a reply) has dropped so far."""
    guard = nft_table(world.router, "inet", GUARD_TABLE)
    assert guard is not None, "no guard table"
    return [i["rule"] for i in guard if "rule" in i][-1]["expr"][1]["counter"]["packets"]


def passes(ns, dst):
    """Every protocol gets through: TCP connects, UDP echoes, ping answers."""
    return (tcp_connect(ns, dst, 80), udp_echo(ns, dst, 7), ping(ns, dst)) == ("open", "reply", True)


def stopped(ns, dst):
    """Nothing gets through and nothing answers: the host side drops (a reset would need the sandbox's table)."""
    return (
        tcp_connect(ns, dst, 80, timeout=0.5) != "open"
        and udp_echo(ns, dst, 7, timeout=0.5) != "reply"
        and not ping(ns, dst, timeout=0.5)
    )


def test_the_host_side_alone_enforces_every_step_in_both_families(world, host_agent):
    """A record with host_interface and no netns yet: only the host-side table judges it."""
    sb = world.sandboxes[0]
    metadata = [(METADATA4, "32"), (METADATA6, "128")]
    try:
        for addr, bits in metadata:  # the agent's own namespace answers at the guard's addresses
            world.exec(world.router, ["ip", "addr", "add", f"{addr}/{bits}", "dev", "lo", "nodad"])
        assert ping(sb.name, METADATA4) and ping(sb.name, METADATA6)  # reachable without egressd
        a = host_agent().start()
        upsert(a, "h0", sb, 1, netns=False, **CLOSED)
        a.wait_log("host_applied", sandbox="h0", revision=1)
        assert nft_table(sb.name) is None  # nothing in the sandbox itself
        assert passes(sb.name, ALLOWED4) and passes(sb.name, ALLOWED6)
        assert stopped(sb.name, DENIED4) and stopped(sb.name, DENIED6)
        assert a.status()["h0"]["state"] == "pending"  # its own table is not there yet: not "enforced"

        deny = [DENIED4, DENIED6, "198.51.100.0/24"]
        upsert(a, "h0", sb, 2, netns=False, deny_out=deny, allow_out=[ALLOWED4, METADATA4, METADATA6])
        a.wait_log("host_applied", sandbox="h0", revision=2)
        assert passes(sb.name, ALLOWED4)  # allow_out before deny_out
        assert stopped(sb.name, "198.51.100.20") and stopped(sb.name, DENIED6)
        assert passes(sb.name, "2001:db8:1::20")  # the internet is open; only deny_out entries are not
        # guard.deny, whatever the policy: even in allow_out (which goes before guard.private, fc00::/7)
        assert stopped(sb.name, METADATA4) and stopped(sb.name, METADATA6)
    finally:
        for addr, bits in metadata:
            world.exec(world.router, ["ip", "addr", "del", f"{addr}/{bits}", "dev", "lo"], check=False)


PACKET_SOCKET_PROBES = [
    {"dst": dst, "proto": proto, "dport": 7, "via": "packet"}
    for dst in (DENIED4, DENIED6)
    for proto in ("udp", "tcp", "icmp")
]


def test_packets_sent_below_the_sandbox_table_do_not_get_past_the_host_side(world, host_agent):
    sb = world.sandboxes[1]
    a = host_agent().start()
    upsert(a, "h1", sb, 1, host=False, **CLOSED)
    assert a.wait("h1", 1)
    # The hole: root in the sandbox's namespace writes frames to a packet socket; its own table never sees them.
    with Sniffer(world.inet) as control:
        scapy_send(sb.name, PACKET_SOCKET_PROBES)
    assert {DENIED4, DENIED6} <= {str(l3(p).dst) for p in control.ip_packets()}, "the bypass must be real"

    upsert(a, "h1", sb, 2, **CLOSED)
    assert a.wait("h1", 2)
    a.wait_log("host_applied", sandbox="h1", revision=2)
    allowed = [{**spec, "dst": ALLOWED4 if "." in spec["dst"] else ALLOWED6} for spec in PACKET_SOCKET_PROBES]
    with Sniffer(world.inet) as sniffer:
        scapy_send(sb.name, PACKET_SOCKET_PROBES + allowed)
    arrived = {str(l3(p).dst) for p in sniffer.ip_packets()}
    assert DENIED4 not in arrived and DENIED6 not in arrived
    assert {ALLOWED4, ALLOWED6} <= arrived  # the same frames reach an allowed destination: they are real


def test_neighbour_solicitations_for_remote_addresses_stop_at_the_host(world, host_agent):
    """The residual channel of the sandbox's own table: ND with hop limit 255 is accepted whatever its
    destination. The host side accepts it only towards the link (link-local, multicast, the host itself)."""
    sb = world.sandboxes[0]
    ns_remote = {"dst": DENIED6, "proto": "icmp", "icmp_type": 135, "ttl": 255, "count": 3}
    a = host_agent().start()
    upsert(a, "h2", sb, 1, host=False, allow_internet_access=False)
    assert a.wait("h2", 1)
    with Sniffer(world.inet, bpf="icmp6") as control:
        scapy_send(sb.name, [ns_remote])
    assert [str(l3(p).dst) for p in control.ip_packets()].count(DENIED6) >= 1, "the channel must be real"

    upsert(a, "h2", sb, 2, allow_internet_access=False, allow_out=[ALLOWED6])
    assert a.wait("h2", 2)
    a.wait_log("host_applied", sandbox="h2", revision=2)
    subprocess.run(["ip", "-n", sb.name, "-6", "neigh", "flush", "all"], check=True, timeout=5)
    with Sniffer(world.inet, bpf="icmp6") as sniffer:
        scapy_send(sb.name, [ns_remote])
        assert passes(sb.name, ALLOWED6)  # neighbour discovery with the gateway still works
    assert DENIED6 not in {str(l3(p).dst) for p in sniffer.ip_packets()}


def test_restart_adopts_repair_and_removal(world, host_agent):
    sb0, sb1 = world.sandboxes
    a = host_agent(resync_interval=1.0).start()
    upsert(a, "r0", sb0, 1, **CLOSED)
    upsert(a, "r1", sb1, 1, allow_internet_access=False)
    assert a.wait("r0", 1) and a.wait("r1", 1)
    assert host_tables(world) == {table_name(sb0.host_if), table_name(sb1.host_if)}
    before = handle(world, sb0.host_if)
    written = as_written(nft_table(world.router, "netdev", table_name(sb0.host_if)))
    guard = as_written(nft_table(world.router, "inet", GUARD_TABLE))

    a.kill()
    a.send({"type": "delete", "id": "r1"})  # deleted while no agent runs
    a.start()
    assert a.wait("r0", 1)
    assert len(a.events("host_applied")) == 2  # both from the first run: the restart wrote nothing
    assert a.status()["r0"]["writes"] == 0 and handle(world, sb0.host_if) == before
    assert host_tables(world) == {table_name(sb0.host_if)}, "r1's table must go"

    # An operator flushes the host's firewall: the next resync puts both tables back.
    subprocess.run(["ip", "netns", "exec", world.router, "nft", "flush", "ruleset"], check=True, timeout=5)
    a.wait_log("host_repaired", sandbox="r0", timeout=10)
    a.wait_log("host_guard_repaired", timeout=10)
    assert as_written(nft_table(world.router, "netdev", table_name(sb0.host_if))) == written
    assert as_written(nft_table(world.router, "inet", GUARD_TABLE)) == guard

    a.send({"type": "delete", "id": "r0"})
    a.wait_log("host_removed", sandbox="r0")
    assert host_tables(world) == set()


def test_the_apply_command_writes_the_host_side_too(world, tmp_path):
    """`egressd apply` without an agent: a record with only host_interface is enforced on the host."""
    sb = world.sandboxes[1]
    record = {"id": "cli", "host_interface": sb.host_if, "network_policy": CLOSED}
    path = tmp_path / "record.json"
    path.write_text(json.dumps(record))
    argv = ["ip", "netns", "exec", world.router, sys.executable, "-m", "egressd", "apply", str(path)]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert f"cli: host side applied on {sb.host_if}" in out.stdout
        assert passes(sb.name, ALLOWED4) and stopped(sb.name, DENIED4) and stopped(sb.name, DENIED6)
        again = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        assert f"cli: host side unchanged on {sb.host_if}" in again.stdout
    finally:
        for family, table in (("netdev", table_name(sb.host_if)), ("inet", GUARD_TABLE)):
            subprocess.run(["ip", "netns", "exec", world.router, "nft", "delete", "table", family, table],
                           timeout=5, capture_output=True)  # fmt: skip
    assert passes(sb.name, DENIED4)


def test_replies_on_connections_opened_from_outside_still_pass(world, host_agent):
    """The ingress hook runs before conntrack: a deny there only marks, and the guard table lets marked
    replies through. A closed sandbox still answers a connection opened from outside, in both families,
    while what it opens itself to the same address is dropped."""
    sb = world.sandboxes[0]
    a = host_agent().start()
    upsert(a, "in0", sb, 1, netns=False, allow_internet_access=False)
    a.wait_log("host_applied", sandbox="in0", revision=1)
    assert tcp_connect(world.inet, sb.addr4, SANDBOX_TCP_PORT) == "open"
    assert tcp_connect(world.inet, sb.addr6, SANDBOX_TCP_PORT) == "open"
    drops = guard_drops(world)  # the guard table stays in the router between tests: count from here
    assert stopped(sb.name, DENIED4) and stopped(sb.name, DENIED6)
    assert guard_drops(world) > drops  # what it opened itself was dropped there


def test_a_host_side_table_altered_in_place_is_repaired_by_a_resync(world, host_agent):
    """The agent reads its host-side tables over raw netlink (nfnl_listing.py). A rule inserted ahead of
    the policy, with the fingerprint left alone, is seen by the digest alone; the resync puts the table
    back as written, and the denied destination is stopped again."""
    sb = world.sandboxes[0]
    a = host_agent(resync_interval=1.0).start()
    upsert(a, "t0", sb, 1, netns=False, **CLOSED)
    a.wait_log("host_applied", sandbox="t0", revision=1)
    table = table_name(sb.host_if)
    written = as_written(nft_table(world.router, "netdev", table))
    decide = next(i["chain"]["name"] for i in nft_table(world.router, "netdev", table) if "chain" in i
                  and i["chain"]["name"].startswith("decide_"))  # fmt: skip
    world.exec(world.router, ["nft", "insert", "rule", "netdev", table, decide, "accept"])
    assert passes(sb.name, DENIED4)  # the edit is real: the host side lets everything through
    a.wait_log("host_repaired", sandbox="t0", detail="table was altered in place", timeout=10)
    assert as_written(nft_table(world.router, "netdev", table)) == written
    assert stopped(sb.name, DENIED4)
    # An empty chain nothing jumps to shows only in the table's use count: it is seen too, and the repair
    # takes it out (what is not egressd's goes in the switch), so it is repaired once, not at every resync.
    world.exec(world.router, ["nft", "add", "chain", "netdev", table, "planted"])
    a.wait_log("host_repaired", sandbox="t0", detail="table was altered in place", count=2, timeout=10)
    assert as_written(nft_table(world.router, "netdev", table)) == written
    time.sleep(3.5)  # three more resyncs
    assert len(a.events("host_repaired")) == 2
    assert not a.events("host_failed")
