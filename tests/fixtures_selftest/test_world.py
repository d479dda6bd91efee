"""Self-test of netns_fixtures: the world routes both families end to end and the probes say what happened.

Needs root (real network namespaces). Nothing here touches the machine's own namespace; one test checks
exactly that.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator

import pytest

from netns_fixtures import (
    SandboxNS,
    Sniffer,
    World,
    cleanup,
    open_tcp,
    ping,
    scapy_send,
    tcp_connect,
    tcp_probe,
    udp_echo,
)
from netns_fixtures._nsutil import list_namespaces
from netns_fixtures.probe import l3

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces"),
]

V4, V6 = "198.51.100.10", "2001:db8::10"
FAMILIES = pytest.mark.parametrize("dst", [V4, V6], ids=["v4", "v6"])


def _prefix(tag: str) -> str:
    return f"nfst{os.getpid() % 10000}{tag}"


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    prefix = _prefix("m")
    cleanup(prefix)
    with World(prefix, sandboxes=2, vm=True) as w:
        yield w
    assert list_namespaces(prefix) == []


@pytest.fixture
def sb(world: World) -> SandboxNS:
    return world.sandboxes[0]


@contextlib.contextmanager
def nft_rule(world: World, ns: str, hook: str, rule: str) -> Iterator[None]:
    """One throwaway `inet t` table with one rule in a base chain on ``hook``; removed afterwards."""
    script = f"table inet t {{\n  chain c {{\n    type filter hook {hook} priority 0;\n    {rule}\n  }}\n}}\n"
    world.exec(ns, ["nft", "-f", "-"], input=script)
    try:
        yield
    finally:
        world.exec(ns, ["nft", "delete", "table", "inet", "t"])


def _root_view() -> tuple[str, str, str]:
    """Links and routes of the namespace this test runs in (the machine's own)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=10).stdout
    links = "\n".join(sorted(line.split(":")[1].strip() for line in links.splitlines()))
    routes4 = subprocess.run(["ip", "-4", "route", "show", "table", "all"], capture_output=True, text=True)
    routes6 = subprocess.run(["ip", "-6", "route", "show", "table", "all"], capture_output=True, text=True)
    return links, routes4.stdout, routes6.stdout


def _running(pid: int) -> bool:
    """Exists and is not a zombie (our own unreaped children may linger as zombies)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


# --------------------------------------------------------------------------- plain reachability, no rules
@FAMILIES
def test_tcp_echo_from_sandbox(sb: SandboxNS, dst: str) -> None:
    for port in (80, 443, 5001):
        assert tcp_connect(sb.name, dst, port) == "open", port


@FAMILIES
def test_closed_tcp_port_resets(sb: SandboxNS, dst: str) -> None:
    assert tcp_connect(sb.name, dst, 81) == "reset"


@FAMILIES
def test_udp_echo_and_ping_from_sandbox(sb: SandboxNS, dst: str) -> None:
    assert udp_echo(sb.name, dst, 7) == "reply"
    assert udp_echo(sb.name, dst, 5353) == "reply"
    assert udp_echo(sb.name, dst, 9) == "refused"
    assert ping(sb.name, dst)


@pytest.mark.parametrize("dst", ["192.0.2.77", "203.0.113.200", "2001:db8:ffff::1", "2001:db8:1::20"])
def test_every_documentation_address_answers(sb: SandboxNS, dst: str) -> None:
    assert (tcp_connect(sb.name, dst, 80), udp_echo(sb.name, dst, 7), ping(sb.name, dst)) == (
        "open",
        "reply",
        True,
    )


@FAMILIES
def test_vm_reaches_internet_through_sandbox(world: World, dst: str) -> None:
    for sb in world.sandboxes:
        assert sb.vm is not None
        assert tcp_connect(sb.vm.name, dst, 80) == "open"
        assert udp_echo(sb.vm.name, dst, 7) == "reply"
        assert ping(sb.vm.name, dst)


def test_connections_from_outside_into_sandbox_and_vm(world: World) -> None:
    for sb in world.sandboxes:
        assert sb.vm is not None
        for addr in (sb.addr4, sb.addr6):
            assert tcp_connect(world.router, addr, 8080) == "open"
            assert tcp_connect(world.inet, addr, 8080) == "open"
        for addr in (sb.vm.addr4, sb.vm.addr6):
            assert tcp_connect(world.inet, addr, 8080) == "open"


def test_sandboxes_have_the_documented_addresses(world: World) -> None:
    sb1 = world.sandboxes[1]
    assert (sb1.name, sb1.addr4, sb1.addr6, sb1.gw4, sb1.gw6) == (
        f"{world.prefix}sb1",
        "10.200.1.2",
        "fd00:200:1::2",
        "10.200.1.1",
        "fd00:200:1::1",
    )
    assert sb1.vm is not None and (sb1.vm.addr4, sb1.vm.addr6) == ("10.210.1.2", "fd00:210:1::2")
    assert sb1.netns_path == f"/run/netns/{sb1.name}" and os.path.exists(sb1.netns_path)
    assert len(sb1.host_if) <= 15
    shown = world.exec(world.router, ["ip", "-br", "addr", "show", "dev", sb1.host_if]).stdout
    assert "10.200.1.1/24" in shown and "fd00:200:1::1/64" in shown


def test_build_is_fast(world: World) -> None:
    assert world.build_seconds is not None
    print(f"2 sandboxes + 2 vms built in {world.build_seconds:.3f}s")
    assert world.build_seconds < 5.0


# --------------------------------------------------------------------------- crafted packets + sniffer
@pytest.mark.parametrize("dst", ["198.51.100.7", "2001:db8::7"], ids=["v4", "v6"])
def test_sniffer_in_inet_sees_crafted_sctp_and_proto_253(world: World, sb: SandboxNS, dst: str) -> None:
    with Sniffer(world.inet, bpf="not icmp and not icmp6") as sniff:
        sent = scapy_send(
            sb.name,
            [
                {"dst": dst, "proto": "sctp", "dport": 5060},
                {"dst": dst, "proto": "raw", "proto_num": 253, "payload": "deadbeef"},
            ],
        )
    assert sent == 2
    assert len(sniff.packets_to(dst, proto=132)) == 1
    raw = sniff.packets_to(dst, proto=253)
    assert len(raw) == 1
    assert raw[0]["Raw"].load == bytes.fromhex("deadbeef")
    assert {l3(p).src for p in sniff.packets_to(dst)} == {sb.addr6 if ":" in dst else sb.addr4}


def test_sniffer_sees_forwarded_vm_packets_twice_in_sandbox(world: World, sb: SandboxNS) -> None:
    assert sb.vm is not None
    with Sniffer(sb.name, iface="any", bpf="ip proto 253") as sniff:
        scapy_send(sb.vm.name, {"dst": "203.0.113.9", "proto": "raw", "proto_num": 253})
    # In on tap0, out on eth0: -i any shows a forwarded packet once per interface.
    assert sniff.count(lambda p: p.haslayer("IP") and p["IP"].proto == 253) == 2


# --------------------------------------------------------------------------- probes under nftables rules
@FAMILIES
def test_output_reject_admin_prohibited_is_unreachable(world: World, sb: SandboxNS, dst: str) -> None:
    fam = "ip6" if ":" in dst else "ip"
    with nft_rule(world, sb.name, "output", f"{fam} daddr {dst} reject with icmpx admin-prohibited"):
        out = tcp_probe(sb.name, dst, 80)
        # v4 reports EHOSTUNREACH, v6 EACCES; both arrive at once (see probe._connect for why).
        assert out.result == "unreachable", out
        assert out.seconds < 0.5, out
        assert udp_echo(sb.name, dst, 7) == "unreachable"  # EPERM from send(): reject drops locally
        assert not ping(sb.name, dst)
    assert tcp_connect(sb.name, dst, 80) == "open"


@FAMILIES
def test_output_reject_tcp_reset_is_reset(world: World, sb: SandboxNS, dst: str) -> None:
    fam = "ip6" if ":" in dst else "ip"
    with nft_rule(world, sb.name, "output", f"{fam} daddr {dst} meta l4proto tcp reject with tcp reset"):
        assert tcp_connect(sb.name, dst, 80) == "reset"
        assert udp_echo(sb.name, dst, 7) == "reply"


@FAMILIES
def test_output_drop_is_timeout(world: World, sb: SandboxNS, dst: str) -> None:
    fam = "ip6" if ":" in dst else "ip"
    with nft_rule(world, sb.name, "output", f"{fam} daddr {dst} drop"):
        assert tcp_connect(sb.name, dst, 80, timeout=0.5) == "timeout"
        # A local drop makes send() fail with EPERM at once: UDP cannot tell drop from reject here.
        assert udp_echo(sb.name, dst, 7, timeout=0.5) == "unreachable"


@FAMILIES
def test_forward_rules_apply_to_vm_traffic(world: World, sb: SandboxNS, dst: str) -> None:
    assert sb.vm is not None
    fam = "ip6" if ":" in dst else "ip"
    with nft_rule(world, sb.name, "forward", f"{fam} daddr {dst} reject with icmpx admin-prohibited"):
        assert tcp_connect(sb.vm.name, dst, 80) == "unreachable"
        assert udp_echo(sb.vm.name, dst, 7) == "unreachable"
        assert tcp_connect(sb.name, dst, 80) == "open"  # the sandbox's own traffic is not forwarded
    with nft_rule(world, sb.name, "forward", f"{fam} daddr {dst} drop"):
        assert tcp_connect(sb.vm.name, dst, 80, timeout=0.5) == "timeout"
        assert udp_echo(sb.vm.name, dst, 7, timeout=0.5) == "timeout"


@FAMILIES
@pytest.mark.parametrize(
    ("rule", "expected"),
    [("drop", "timeout"), ("meta l4proto tcp reject with tcp reset", "reset")],
    ids=["drop", "reset"],
)
def test_held_session_is_cut_when_policy_tightens(
    world: World, sb: SandboxNS, dst: str, rule: str, expected: str
) -> None:
    fam = "ip6" if ":" in dst else "ip"
    with open_tcp(sb.name, dst, 5001) as session:
        assert session.exchange(b"before\n") == "ok"
        with nft_rule(world, sb.name, "output", f"{fam} daddr {dst} {rule}"):
            assert session.exchange(b"after\n", timeout=0.5) == expected


# --------------------------------------------------------------------------- lifecycle and safety
def test_world_exit_removes_everything_and_never_touches_root_namespace() -> None:
    prefix = _prefix("x")
    cleanup(prefix)
    before = _root_view()
    with World(prefix, sandboxes=1, vm=True) as w:
        assert list_namespaces(prefix) == sorted(w.namespaces)
        assert _root_view() == before
        assert tcp_connect(w.sandboxes[0].name, V4, 80) == "open"
        sniffer = Sniffer(w.inet).start()  # left running on purpose: close() must kill it
        pids = [int(p) for p in subprocess.check_output(["ip", "netns", "pids", w.inet], text=True).split()]
        assert len(pids) >= 2  # echo server + tcpdump
    assert list_namespaces(prefix) == []
    assert _root_view() == before
    assert [pid for pid in pids if _running(pid)] == []
    sniffer.stop()
    w.close()  # idempotent


def test_cleanup_removes_leftovers_of_a_crashed_run() -> None:
    prefix = _prefix("c")
    subprocess.run(["ip", "netns", "add", f"{prefix}inet"], check=True, timeout=10)
    subprocess.run(["ip", "netns", "add", f"{prefix}sb0"], check=True, timeout=10)
    with pytest.raises(FileExistsError):
        World(prefix, sandboxes=1).start()
    assert cleanup(prefix) == [f"{prefix}inet", f"{prefix}sb0"]
    assert list_namespaces(prefix) == []


@pytest.mark.parametrize("prefix", ["", "x", "a/b", "-lead", "has space", "y" * 30])
def test_bad_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(ValueError):
        cleanup(prefix)
