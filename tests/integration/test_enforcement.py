"""Real packets through real namespaces obey each step of the documented semantics, both families.

Every test applies a policy with the real libnftables backend and then probes from inside the sandbox:
TCP (a reset when denied), UDP (ICMP administratively prohibited when denied) and ICMP echo, IPv4 and IPv6.
"""

import contextlib
import re
import socket
import struct
import subprocess
import time

import pytest

from egressd.model.config import Config
from egressd.ruleset.render import render
from netns_fixtures import in_netns, netns_socket
from netns_fixtures.probe import Sniffer, open_tcp, ping, tcp_connect, udp_echo

pytestmark = pytest.mark.root

# Documentation addresses the world's "internet" answers on (every one of them is local there).
OK4, OTHER4, BAD4 = "198.51.100.10", "198.51.100.20", "203.0.113.5"
OK6, OTHER6, BAD6 = "2001:db8:1::10", "2001:db8:1::20", "2001:db8:bad::5"


def reachable(ns: str, dst: str) -> dict[str, bool]:
    return {
        "tcp": tcp_connect(ns, dst, 80) == "open",
        "udp": udp_echo(ns, dst, 7) == "reply",
        "icmp": ping(ns, dst),
    }


def assert_open(ns: str, *dsts: str) -> None:
    for dst in dsts:
        assert reachable(ns, dst) == {"tcp": True, "udp": True, "icmp": True}, dst


def assert_denied(ns: str, *dsts: str, tcp: str = "reset", udp: str = "unreachable") -> None:
    """Denied means: TCP gets a reset, UDP an ICMP error, ping nothing back."""
    for dst in dsts:
        assert (tcp_connect(ns, dst, 80), udp_echo(ns, dst, 7), ping(ns, dst)) == (tcp, udp, False), dst


def test_without_a_table_everything_is_reachable(world):
    sb = world.sandboxes[0]
    assert_open(sb.name, OK4, BAD4, OK6, BAD6, world.inet_addr4, world.inet_addr6)


def test_default_policy_is_internet_on_private_off(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb)
    assert_open(sb.name, OK4, BAD4, OK6, BAD6)
    # The inet namespace's link addresses (10.255.0.2, fd00:255::2) are private ranges: guard.private.
    assert_denied(sb.name, world.inet_addr4, world.inet_addr6)


def test_internet_off_allows_only_allow_out_in_both_families(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False, allow_out=[OK4, OK6])
    assert_open(sb.name, OK4, OK6)
    assert_denied(sb.name, OTHER4, BAD4, OTHER6, BAD6, world.inet_addr4)


def test_an_ipv4_only_allowlist_leaves_no_ipv6_open(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False, allow_out=["198.51.100.0/24"])
    assert_open(sb.name, OK4, OTHER4)
    assert_denied(sb.name, OK6, BAD6, BAD4)


def test_deny_out_with_internet_on(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, deny_out=["203.0.113.0/24", "2001:db8:bad::/48"])
    assert_open(sb.name, OK4, OTHER4, OK6, OTHER6)
    assert_denied(sb.name, BAD4, BAD6)


def test_allow_out_is_evaluated_before_deny_out(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_out=[OK4, OK6], deny_out=["198.51.100.0/24", "2001:db8:1::/48"])
    assert_open(sb.name, OK4, OK6)
    assert_denied(sb.name, OTHER4, OTHER6)


def test_guard_deny_beats_allow_out_and_guard_allow_beats_deny_out(world, enforce):
    sb = world.sandboxes[0]
    guard = {"guard": {"deny": [BAD4, BAD6], "allow": [OTHER4, OTHER6]}}
    enforce(
        sb,
        config=guard,
        allow_internet_access=False,
        allow_out=["203.0.113.0/24", "2001:db8:bad::/48"],
        deny_out=[OTHER4, OTHER6],
    )
    assert_denied(sb.name, BAD4, BAD6)
    assert_open(sb.name, OTHER4, OTHER6)


def test_allow_out_reaches_a_private_range(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_out=["10.255.0.0/30", "fd00:255::/64"])
    assert_open(sb.name, world.inet_addr4, world.inet_addr6)
    other = world.sandboxes[1]  # private too, outside the allowed range: still denied
    assert_denied(sb.name, other.addr4, other.addr6)


def test_private_guard_can_be_turned_off(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, config={"guard": {"private": []}}, deny_out=[BAD4, BAD6])
    assert_open(sb.name, world.inet_addr4, world.inet_addr6)
    assert_denied(sb.name, BAD4, BAD6)  # the table is there and judges


def test_drop_mode_is_silent(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, config={"enforce": {"deny_action": "drop"}}, deny_out=[BAD4, BAD6])
    # A drop at the output hook fails a local UDP send() with EPERM at once; TCP just retransmits.
    assert_denied(sb.name, BAD4, BAD6, tcp="timeout", udp="unreachable")
    assert_open(sb.name, OK4, OK6)


def test_loopback_and_own_addresses_stay_reachable_with_internet_off(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False)
    for dst in ("127.0.0.1", "::1", sb.addr4, sb.addr6):
        assert tcp_connect(sb.name, dst, 8080) == "open", dst
    assert_denied(sb.name, OK4, OK6)


def test_connections_opened_from_outside_get_their_replies(world, enforce):
    """The proxy reaching an exposed port: the sandbox's answers are reply-direction packets."""
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False)
    assert tcp_connect(world.router, sb.addr4, 8080) == "open"
    assert tcp_connect(world.router, sb.addr6, 8080) == "open"
    assert ping(world.router, sb.addr4) and ping(world.router, sb.addr6)
    assert_denied(sb.name, sb.gw4, sb.gw6)  # the same peer, the other way: a new connection, denied


def test_ipv6_neighbour_discovery_works_with_internet_off(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False, allow_out=[OK6])
    world.exec(sb.name, ["ip", "-6", "neigh", "flush", "all"])
    assert tcp_connect(sb.name, OK6, 80) == "open"
    assert_denied(sb.name, BAD6)


@pytest.mark.parametrize("dst", [OK4, OK6])
def test_tightening_cuts_an_open_connection(world, enforce, dst):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False, allow_out=[dst])
    session = open_tcp(sb.name, dst, 5001)
    try:
        assert session.exchange(b"before\n") == "ok"
        enforce(sb, allow_internet_access=False)
        assert session.exchange(b"after\n") != "ok"
    finally:
        session.close()


def generation_in_force(record) -> int:
    """The generation the table of record's policy lets through first (ruleset/generation.py)."""
    hook = render(record.policy, Config()).hooks[0]["add"]["rule"]["expr"][0]
    return hook["match"]["right"]


def conntrack_marks(ns: str, dst: str, proto: str, sport: int) -> list[int]:
    """The conntrack mark of the entry (one expected) from the sandbox's port sport to dst, by conntrack(8)."""
    family = "ipv6" if ":" in dst else "ipv4"
    flow = ["-f", family, "-p", proto, "-d", dst, "--sport", str(sport)]
    out = subprocess.run(
        ["ip", "netns", "exec", ns, "conntrack", "-L", *flow],
        capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    return [int(m) for m in re.findall(r"mark=(\d+)", out.stdout)]


@pytest.mark.parametrize("dst", [OK4, OK6])
def test_an_accepted_connection_is_carried_by_its_generation_and_judged_again_on_a_change(
    world, enforce, dst
):
    """After its first packet an open connection is let through by the generation in its conntrack mark: an
    address that leaves a set (as a host name's address does when DNS answers otherwise) stops new
    connections, not that one. A new policy has a new generation and judges it again."""
    sb = world.sandboxes[0]
    record = enforce(sb, allow_internet_access=False, allow_out=[dst])
    session = open_tcp(sb.name, dst, 5001)
    try:
        assert session.exchange(b"before\n") == "ok"
        first, sport = generation_in_force(record), session.sock.getsockname()[1]
        assert conntrack_marks(sb.name, dst, "tcp", sport) == [first]
        family = "6" if ":" in dst else "4"
        nft = ["ip", "netns", "exec", sb.name, "nft", "delete", "element", "inet", "egressd"]
        subprocess.run([*nft, f"allow{family}_a", "{", dst, "}"], check=True, timeout=10)
        assert tcp_connect(sb.name, dst, 80) == "reset"  # a new connection is judged: no longer allowed
        assert session.exchange(b"carried\n") == "ok"  # the open one is let through by its mark
        record = enforce(sb, allow_internet_access=False, allow_out=[dst, OTHER4])
        second = generation_in_force(record)
        assert second != first
        assert session.exchange(b"judged again\n") == "ok"  # allowed by the new policy: marked anew
        assert conntrack_marks(sb.name, dst, "tcp", sport) == [second]
        enforce(sb, allow_internet_access=False, allow_out=[OTHER4])
        assert session.exchange(b"cut\n") != "ok"  # and tightening cuts it
    finally:
        session.close()


@pytest.mark.parametrize("dst", [OK4, OK6])
def test_tightening_cuts_an_open_udp_flow(world, enforce, dst):
    """One UDP flow (the same socket, the same ports) answered before a change and refused after it: its
    mark carries the old generation, which the new table does not let through."""
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False, allow_out=[dst])
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with netns_socket(sb.name, family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(1.0)
        sock.connect((dst, 7))
        sock.send(b"before")
        assert sock.recv(100) == b"before"
        assert len(conntrack_marks(sb.name, dst, "udp", sock.getsockname()[1])) == 1
        enforce(sb, allow_internet_access=False, allow_out=[OTHER4])
        with pytest.raises(OSError):  # ICMP admin-prohibited (refused) or nothing (timeout)
            sock.send(b"after")
            sock.recv(100)
        enforce(sb, allow_internet_access=False, allow_out=[dst])  # control: the flow is let through again
        time.sleep(0.1)
        with contextlib.suppress(OSError):
            sock.recv(100)  # a pending error, if one is queued
        sock.send(b"again")
        assert sock.recv(100) == b"again"


def test_loosening_opens_without_reconnect_delay(world, enforce):
    sb = world.sandboxes[0]
    enforce(sb, allow_internet_access=False)
    assert_denied(sb.name, OK4, OK6)
    enforce(sb, allow_internet_access=False, allow_out=[OK4, OK6])
    assert_open(sb.name, OK4, OK6)


def test_each_sandbox_has_its_own_policy(world, enforce):
    a, b = world.sandboxes
    enforce(a, allow_internet_access=False)
    enforce(b, deny_out=[OK4, OK6])
    assert_denied(a.name, OK4, OTHER4, OK6)
    assert_denied(b.name, OK4, OK6)
    assert_open(b.name, OTHER4, OTHER6)


def test_forwarded_traffic_from_a_microvm_is_judged(world, enforce):
    sb = world.sandboxes[1]
    enforce(sb, allow_internet_access=False, allow_out=[OK4, OK6])
    assert_open(sb.vm.name, OK4, OK6)
    assert_denied(sb.vm.name, OTHER4, OTHER6, BAD4, BAD6)


def test_forwarded_tightening_cuts_a_microvm_connection(world, enforce):
    sb = world.sandboxes[1]
    enforce(sb, deny_out=[])
    session = open_tcp(sb.vm.name, OK4, 5001)
    try:
        assert session.exchange(b"before\n") == "ok"
        enforce(sb, deny_out=[OK4])
        assert session.exchange(b"after\n") != "ok"
    finally:
        session.close()


def join_and_send(world, sb) -> Sniffer:
    """Join ff02::1:3 on the sandbox's eth0, send one datagram to site-scoped ff05::1:3 from the same socket;
    returns what the router saw on the sandbox's link."""
    with Sniffer(world.router, iface=sb.host_if, bpf="ip6") as sniffer:
        with in_netns(sb.name):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
            ifindex = socket.if_nametoindex("eth0")
        try:
            group = socket.inet_pton(socket.AF_INET6, "ff02::1:3") + struct.pack("@I", ifindex)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, group)
            with contextlib.suppress(OSError):
                sock.sendto(b"x", ("ff05::1:3", 9, 0, ifindex))
            time.sleep(0.3)
        finally:
            sock.close()
    return sniffer


def joined(sniffer: Sniffer) -> list:
    return [
        p
        for p in sniffer.packets
        if p.haslayer("ICMPv6MLReport2") and any(r.dst == "ff02::1:3" for r in p["ICMPv6MLReport2"].records)
    ]


def test_multicast_listener_reports_stay_on_the_link_with_internet_off(world, enforce):
    """A snooping bridge needs MLD reports to deliver neighbour solicitations; they must leave, nothing else."""
    sb = world.sandboxes[0]
    control = join_and_send(world, sb)  # no table yet: both leave
    assert joined(control) and control.packets_to("ff05::1:3")
    enforce(sb, allow_internet_access=False)
    sniffer = join_and_send(world, sb)
    assert joined(sniffer), "the sandbox's report for ff02::1:3 did not leave"
    # Site-scoped multicast is not on the link: denied like any other destination.
    assert sniffer.packets_to("ff05::1:3") == []
