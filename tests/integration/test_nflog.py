"""nfnetlink_log (nflog.py) on the real kernel: denied packets logged by an nftables rule reach the socket
bound to the group, parsed; the group is one socket's per namespace, shared with nftables events, and freed
when that socket closes.

Everything happens in scratch namespaces made here and never connected to the machine's network: each has a
veth pair with both ends inside it (this kernel has no dummy driver), 192.0.2.x/24 and 2001:db8::x/64 on one
end so sends to documentation addresses route, and a table that logs and drops what goes to 192.0.2.1 and
2001:db8::1 before it leaves.
"""

import contextlib
import errno
import json
import os
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from egressd.kernel.monitor_socket import (
    FD_BASE,
    NETLINK_ADD_MEMBERSHIP,
    NFNLGRP_NFTABLES,
    SOL_NETLINK,
    open_watch,
    raise_fd_limit,
)
from egressd.kernel.netns import in_netns
from egressd.kernel.nflog import LoggedPacket, LogGroupError, bind_log_group, is_log_datagram, parse_packets
from egressd.kernel.nfnl import NETLINK_NETFILTER, ruleset_generation

pytestmark = pytest.mark.root

GROUP = 7
DENIED4, DENIED6 = "192.0.2.1", "2001:db8::1"
WAIT_S = 5.0  # functional bound, not a timing claim: the machine is shared and noisy
QUIET_S = 1.0  # how long a socket that should hear nothing is listened to (the kernel flushes after 10 ms)
TABLE = f"""
table inet nflogtest {{
    chain out {{
        type filter hook output priority 0; policy accept;
        ip daddr {DENIED4} log prefix "deny_out" group {GROUP} drop
        ip6 daddr {DENIED6} log prefix "deny_out" group {GROUP} drop
    }}
}}
"""


def nsexec(ns: str, *argv: str, stdin: str | None = None) -> str:
    out = subprocess.run(
        ["ip", "netns", "exec", ns, *argv], input=stdin, capture_output=True, text=True, timeout=10
    )
    assert out.returncode == 0, (argv, out.stderr)
    return out.stdout


class Scratch:
    """One throwaway namespace: its name, the address of its veth end, that end's ifindex."""

    def __init__(self, name: str, host: int) -> None:
        self.name, self.path = name, f"/run/netns/{name}"
        self.v4, self.v6 = f"192.0.2.{host}", f"2001:db8::{host}"
        for argv in (
            ["ip", "link", "set", "lo", "up"],
            ["ip", "link", "add", "eg0", "type", "veth", "peer", "name", "eg1"],
            ["ip", "link", "set", "eg1", "up"],
            ["ip", "link", "set", "eg0", "up"],
            ["ip", "addr", "add", f"{self.v4}/24", "dev", "eg0"],
            ["ip", "-6", "addr", "add", f"{self.v6}/64", "dev", "eg0", "nodad"],
        ):
            nsexec(name, *argv)
        nsexec(name, "nft", "-f", "-", stdin=TABLE)
        self.ifindex = json.loads(nsexec(name, "ip", "-j", "link", "show", "eg0"))[0]["ifindex"]

    def socket(self, events: bool = True) -> socket.socket:
        """A NETLINK_NETFILTER socket made in this namespace, in the nftables event group if events."""

        def make() -> socket.socket:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
            sock.bind((0, 0))
            if events:
                sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
            return sock

        return in_netns(self.path, make)[0]

    def send_denied(self, dst4: str = DENIED4, dst6: str = DENIED6) -> None:
        """From inside: a TCP connect (non-blocking), a UDP datagram of 1000 bytes and an ICMP echo to dst4,
        a TCP connect and an ICMPv6 echo to dst6 (raw sockets, as root)."""

        def send() -> None:
            with contextlib.ExitStack() as stack:
                new = lambda *a: stack.enter_context(socket.socket(*a))  # noqa: E731
                for sock, data, dst in (
                    (new(socket.AF_INET, socket.SOCK_DGRAM), b"q" * 1000, (dst4, 53)),
                    (new(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP), echo4(), (dst4, 0)),
                    (new(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6), echo6(), (dst6, 0)),
                ):
                    with contextlib.suppress(PermissionError):  # a drop answers the sender with EPERM
                        sock.sendto(data, dst)
                for family, dst, port in ((socket.AF_INET, dst4, 443), (socket.AF_INET6, dst6, 8443)):
                    tcp = new(family, socket.SOCK_STREAM)
                    tcp.setblocking(False)
                    tcp.connect_ex((dst, port))  # EINPROGRESS: the SYN is sent, and dropped

        in_netns(self.path, send)

    def nft(self, *args: str) -> None:
        nsexec(self.name, "nft", *args)


def echo4() -> bytes:
    """An ICMP echo request with its checksum (a raw IPv4 socket sends what it is given)."""
    body = struct.pack("!BBHHH", 8, 0, 0, 0x4567, 1) + b"ping"
    total = sum(struct.unpack(f"!{len(body) // 2}H", body))
    total = (total & 0xFFFF) + (total >> 16)
    return body[:2] + struct.pack("!H", ~total & 0xFFFF) + body[4:]


def echo6() -> bytes:
    return struct.pack("!BBHHH", 128, 0, 0, 0x4567, 1) + b"ping"  # the kernel fills the ICMPv6 checksum


@pytest.fixture
def scratch() -> Iterator[Callable[[int], Scratch]]:
    """A factory of scratch namespaces (host: the last byte of their addresses); all deleted after the test."""
    names: list[str] = []

    def make(host: int = 100) -> Scratch:
        name = f"egnflog{os.getpid() % 100000}x{len(names)}"
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        names.append(name)
        return Scratch(name, host)

    try:
        yield make
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


def read(sock: socket.socket, done: Callable[[list[LoggedPacket], list[bytes]], bool], wait: float = WAIT_S):
    """(log packets, other datagrams) read from sock until done(...) or wait has passed. Every datagram
    comes from the kernel, and no log message is malformed."""
    packets: list[LoggedPacket] = []
    others: list[bytes] = []
    deadline = time.monotonic() + wait
    poller = select.poll()  # not select(): the agent's sockets live at descriptors above 1024
    poller.register(sock, select.POLLIN)
    while not done(packets, others) and (left := deadline - time.monotonic()) > 0:
        if not poller.poll(left * 1000):
            continue
        data, (sender, _) = sock.recvfrom(1 << 16, socket.MSG_DONTWAIT)
        assert sender == 0
        if is_log_datagram(data):
            got, skipped = parse_packets(memoryview(data))
            assert skipped == 0, data.hex()
            packets += got
        else:
            others.append(data)
    return packets, others


KINDS = {(4, 6), (4, 17), (4, 1), (6, 6), (6, 58)}  # (family, proto) of what send_denied sends


def all_kinds(packets: list[LoggedPacket], _others: list[bytes] | None = None) -> bool:
    return {(p.family, p.proto) for p in packets} >= KINDS


def unbind(sock: socket.socket, group: int) -> int:
    """Send NFULNL_CFG_CMD_UNBIND for group, as a tenant's program could; the errno of the kernel's ack.
    Layout: nlmsghdr (type 0x0401 CONFIG, flags REQUEST|ACK), nfgenmsg (AF_UNSPEC, 0, be16 group), then
    the attribute NFULA_CFG_CMD (1) holding the command UNBIND (2), padded to 4 bytes."""
    body = struct.pack("=BB", 0, 0) + struct.pack("!H", group) + struct.pack("=HHB3x", 5, 1, 2)
    sock.send(struct.pack("=IHHII", 16 + len(body), 0x0401, 0x1 | 0x4, 4242, 0) + body)
    sock.settimeout(WAIT_S)
    while True:
        data = sock.recv(1 << 16)
        _, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
        if kind == 2 and seq == 4242:  # NLMSG_ERROR: the ack
            return -struct.unpack_from("=i", data, 16)[0]


def nflog_proc(ns: Scratch) -> list[list[int]]:
    """The namespace's log instances, as /proc lists them: group, port, queued, copy mode, copy range,
    flush timeout, references."""
    text = nsexec(ns.name, "cat", "/proc/net/netfilter/nfnetlink_log")
    return [[int(x) for x in line.split()] for line in text.splitlines()]


def default_loggers(ns: Scratch) -> tuple[str, str]:
    return tuple(nsexec(ns.name, "cat", f"/proc/sys/net/netfilter/nf_log/{pf}").strip() for pf in (2, 10))


def test_denied_packets_arrive_parsed_without_any_pf_bind(scratch):
    ns = scratch()
    loggers = default_loggers(ns)
    with ns.socket() as sock:
        bind_log_group(sock, GROUP, 128, flush_cs=1)
        port = sock.getsockname()[0]
        assert nflog_proc(ns) == [[GROUP, port, 0, 2, 128, 1, 1]]  # copy packet, 128 bytes, 10 ms
        assert default_loggers(ns) == loggers and "nfnetlink_log" not in loggers  # no PF_BIND was needed
        ns.send_denied()
        packets, _ = read(sock, all_kinds)
    by_kind = {(p.family, p.proto): p for p in packets}
    assert set(by_kind) == KINDS, packets
    for p in packets:
        assert (p.prefix, p.indev, p.outdev) == ("deny_out", None, ns.ifindex)
        assert (p.src, p.dst) == ((ns.v4, DENIED4) if p.family == 4 else (ns.v6, DENIED6))
    assert (by_kind[4, 6].dport, by_kind[4, 6].icmp_type) == (443, None)
    assert (by_kind[4, 17].dport, by_kind[4, 17].length) == (53, 1028)  # the header's length, not the copy's
    assert (by_kind[4, 1].dport, by_kind[4, 1].icmp_type, by_kind[4, 1].length) == (None, 8, 28 + 4)
    assert (by_kind[6, 6].dport, by_kind[6, 58].icmp_type, by_kind[6, 58].length) == (8443, 128, 40 + 12)


def test_a_second_socket_in_the_namespace_gets_eperm_and_steals_nothing(scratch):
    ns = scratch()
    with ns.socket() as first, ns.socket() as second:
        bind_log_group(first, GROUP, flush_cs=1)
        with pytest.raises(LogGroupError) as e:
            bind_log_group(second, GROUP)
        assert e.value.errno == 1  # EPERM, whatever the second socket's settings
        assert unbind(second, GROUP) == 1  # nor can another socket (a tenant's) unbind it: EPERM
        bind_log_group(first, GROUP, 256, flush_cs=1)  # the holder itself may bind again: new settings
        assert nflog_proc(ns) == [[GROUP, first.getsockname()[0], 0, 2, 256, 1, 1]]
        ns.send_denied()
        assert all_kinds(read(first, all_kinds)[0])
        assert read(second, lambda p, o: bool(p or o), QUIET_S) == ([], [])  # unsubscribed: hears nothing
        bind_log_group(second, GROUP + 1)  # another group is free


def test_the_group_belongs_to_one_namespace(scratch):
    a, b = scratch(100), scratch(101)
    with a.socket() as in_a, b.socket() as in_b:
        bind_log_group(in_a, GROUP, flush_cs=1)
        bind_log_group(in_b, GROUP, flush_cs=1)  # the same group, in another namespace: no conflict
        a.send_denied()
        got_a, _ = read(in_a, all_kinds)
        assert all_kinds(got_a) and {p.src for p in got_a} == {a.v4, a.v6}
        assert read(in_b, lambda p, o: bool(p), QUIET_S)[0] == []
        b.send_denied()
        got_b, _ = read(in_b, all_kinds)
        assert all_kinds(got_b) and {p.src for p in got_b} == {b.v4, b.v6}
        assert read(in_a, lambda p, o: bool(p), QUIET_S)[0] == []


def test_binding_works_among_nftables_events_and_both_keep_arriving(scratch):
    ns = scratch()
    raise_fd_limit()
    sock, _, generation = open_watch(ns.path, FD_BASE)  # the agent's own socket: non-blocking, events on
    stop = threading.Event()

    def commit_meanwhile() -> None:
        while not stop.is_set():
            ns.nft("add", "table", "inet", "busy")
            ns.nft("delete", "table", "inet", "busy")

    with sock:
        for i in range(5):  # events waiting unread before the ack
            ns.nft("add", "table", "inet", f"queued{i}")
        with ns.socket(events=False) as holder:  # the kernel's refusal is found behind the events too
            bind_log_group(holder, GROUP)
            with pytest.raises(LogGroupError) as e:
                bind_log_group(sock, GROUP)
            assert e.value.errno == 1
            ns.nft("add", "table", "inet", "queued5")
        committer = threading.Thread(target=commit_meanwhile)
        committer.start()
        try:
            time.sleep(0.1)
            bind_log_group(sock, GROUP, flush_cs=1)
        finally:
            stop.set()
            committer.join()
        assert sock.gettimeout() == 0.0  # still non-blocking
        sock.settimeout(2.0)
        after = ruleset_generation(sock, 77, strict=False)  # what the caller does next
        sock.setblocking(False)
        assert generation is not None and after >= generation + 6
        ns.nft("add", "table", "inet", "after")
        ns.send_denied()

        def both(packets: list[LoggedPacket], others: list[bytes]) -> bool:
            return all_kinds(packets) and any(struct.unpack_from("=H", d, 4)[0] >> 8 == 10 for d in others)

        packets, others = read(sock, both)
        assert both(packets, others), (packets, [d[:20].hex() for d in others])


def test_closing_the_socket_frees_the_group_at_once(scratch):
    ns = scratch()
    first = ns.socket(events=False)
    bind_log_group(first, GROUP)
    first.close()
    with ns.socket(events=False) as second:
        bind_log_group(second, GROUP, flush_cs=1)  # no wait, no retry
        assert [row[:2] for row in nflog_proc(ns)] == [[GROUP, second.getsockname()[0]]]
        ns.send_denied()
        assert all_kinds(read(second, all_kinds)[0])


def test_a_tenants_own_rule_can_log_to_the_group_with_any_prefix(scratch):
    """Why a prefix is a hint, never proof: a tenant with CAP_NET_ADMIN adds its own logging rule (it only
    logs: what it logs then leaves), and its messages come from the kernel like egressd's."""
    ns = scratch()
    tenant = """table inet tenant {
        chain o { type filter hook output priority -10; ip daddr 192.0.2.7 log prefix "guard.deny" group 7; }
    }"""
    nsexec(ns.name, "nft", "-f", "-", stdin=tenant)
    with ns.socket() as sock:
        bind_log_group(sock, GROUP, flush_cs=1)
        ns.send_denied(dst4="192.0.2.7", dst6="2001:db8::7")  # to addresses egressd's table lets through
        packets, _ = read(sock, lambda p, o: {4} <= {q.family for q in p})
    assert {(p.prefix, p.dst) for p in packets} >= {("guard.deny", "192.0.2.7")}


def test_a_flood_of_logs_overruns_the_shared_socket_as_lost_events(scratch):
    """The price of one socket: logs left unread fill the buffer events share, and the kernel then reports
    ENOBUFS, which the monitor takes as lost events (and checks the table). Hence the rate limit in the rule."""
    ns = scratch()
    raise_fd_limit()
    sock, _, _ = open_watch(ns.path, FD_BASE, rcvbuf=4096)
    with sock:
        bind_log_group(sock, GROUP, qthresh=1)  # one datagram per packet
        for _ in range(20):
            ns.send_denied()
        with pytest.raises(OSError) as e:
            for _ in range(1000):
                sock.recvfrom(1 << 16)
        assert e.value.errno == errno.ENOBUFS
