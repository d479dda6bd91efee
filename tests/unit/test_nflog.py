"""nfnetlink_log (nflog.py) from bytes built here: no root, no kernel.

The layouts, written out independently of the module (linux/netlink.h, linux/netfilter/nfnetlink.h,
linux/netfilter/nfnetlink_log.h):

    datagram  = message, each padded to 4 bytes
    message   = nlmsghdr {u32 len (header included, padding not), u16 type, u16 flags, u32 seq, u32 pid}
                (host byte order), then the body
    log type  = (NFNL_SUBSYS_ULOG 4 << 8) | NFULNL_MSG_PACKET 0 = 0x0400; CONFIG is 0x0401
    body      = nfgenmsg {u8 family (AF_INET 2, AF_INET6 10), u8 version 0, be16 res_id (the group)},
                then attributes
    attribute = {u16 len (header included), u16 type}, value, padded to 4 bytes
    NFULA_PACKET_HDR 1 {be16 hw_protocol, u8 hook, u8 pad}; NFULA_IFINDEX_INDEV 4, _OUTDEV 5 (be32);
    NFULA_PAYLOAD 9 (the L3 packet, cut at copy_range); NFULA_PREFIX 10 (NUL-terminated)
    a batch of several packets ends with NLMSG_DONE (type 3)
"""

import errno
import random
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.kernel.nflog import (
    LoggedPacket,
    LogGroupError,
    ack_code,
    bind_log_group,
    config_request,
    is_log_datagram,
    parse_packets,
)
from egressd.kernel.nfnl import NetlinkError

LOG_PACKET = 0x0400
NLMSG_DONE, NLMSG_ERROR = 3, 2
NFT_NEWGEN = (10 << 8) | 15  # an nftables event: NFNL_SUBSYS_NFTABLES 10, NFT_MSG_NEWGEN 15
HOOK_OUTPUT = 3


def pad(b: bytes) -> bytes:
    return b + b"\0" * (-len(b) % 4)


def nlattr(kind: int, value: bytes) -> bytes:
    return pad(struct.pack("=HH", 4 + len(value), kind) + value)


def nlmsg(kind: int, body: bytes, seq: int = 0, flags: int = 0) -> bytes:
    return pad(struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body)


def log_msg(
    payload: bytes | None,
    family: int = socket.AF_INET,
    prefix: bytes | None = b"deny_out\0",
    outdev: bytes | None = struct.pack("!I", 3),
    indev: bytes | None = None,
    hw_protocol: int = 0x0800,
    group: int = 2,
) -> bytes:
    """One NFULNL_MSG_PACKET message, attributes in the kernel's order."""
    body = struct.pack("=BB", family, 0) + struct.pack("!H", group)
    body += nlattr(1, struct.pack("!HBB", hw_protocol, HOOK_OUTPUT, 0))
    if prefix is not None:
        body += nlattr(10, prefix)
    if indev is not None:
        body += nlattr(4, indev)
    if outdev is not None:
        body += nlattr(5, outdev)
    if payload is not None:
        body += nlattr(9, payload)
    return nlmsg(LOG_PACKET, body)


def ipv4(proto: int, l4: bytes, src="192.0.2.100", dst="192.0.2.1", frag=0x4000, options=b"", total=None):
    """An IPv4 header: version 4, IHL from the options, total length, identification, flags+offset, TTL,
    protocol, checksum (left 0), addresses."""
    ihl = 5 + len(options) // 4
    total = ihl * 4 + len(l4) if total is None else total
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, total, 0x1234, frag, 64, proto, 0,
                      socket.inet_aton(src), socket.inet_aton(dst))  # fmt: skip
    return hdr + options + l4


def ipv6(next_header: int, rest: bytes, src="2001:db8::100", dst="2001:db8::1", payload_len=None):
    """An IPv6 header: version 6, payload length, next header, hop limit, addresses."""
    plen = len(rest) if payload_len is None else payload_len
    return (
        struct.pack("!IHBB", 0x60000000, plen, next_header, 64)
        + socket.inet_pton(socket.AF_INET6, src)
        + socket.inet_pton(socket.AF_INET6, dst)
        + rest
    )


def ext(next_header: int, units: int = 0) -> bytes:
    """A hop-by-hop, routing or destination-options header: next header, length in 8-byte units beyond 8."""
    return bytes([next_header, units]) + b"\x01\x04\0\0\0\0" + b"\0" * (8 * units)


def frag6(next_header: int, offset: int, more: bool) -> bytes:
    """A fragment header: next header, reserved, offset (13 bits, in 8-byte units) << 3 | M, identification."""
    return struct.pack("!BBHI", next_header, 0, (offset << 3) | int(more), 0xABCD)


def tcp(dport: int, sport: int = 40000) -> bytes:
    return struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x02, 64240, 0, 0)


def udp(dport: int, data: bytes = b"x") -> bytes:
    return struct.pack("!HHHH", 40001, dport, 8 + len(data), 0) + data


def icmp(kind: int) -> bytes:
    return struct.pack("!BBHHH", kind, 0, 0, 1, 1)


def parse_one(datagram: bytes) -> LoggedPacket:
    packets, skipped = parse_packets(datagram)
    assert skipped == 0 and len(packets) == 1, (packets, skipped)
    return packets[0]


# --- well-formed packets ------------------------------------------------------------------------------------


def test_tcp_over_ipv4():
    p = parse_one(log_msg(ipv4(6, tcp(443))))
    assert p == LoggedPacket(4, "deny_out", 6, "192.0.2.100", "192.0.2.1", 443, None, None, 3, 40)


def test_udp_over_ipv4_reports_the_length_the_header_declares_not_the_copy():
    payload = ipv4(17, udp(53, b"q" * 1000))[:128]  # the kernel copies copy_range bytes of 1028
    p = parse_one(log_msg(payload, prefix=b"dns\0", indev=struct.pack("!I", 7), outdev=None))
    assert (p.proto, p.dport, p.length, p.prefix, p.indev, p.outdev) == (17, 53, 1028, "dns", 7, None)


def test_icmp_echo_over_ipv4_has_a_type_and_no_port():
    p = parse_one(log_msg(ipv4(1, icmp(8), dst="203.0.113.9"), prefix=b"internet\0"))
    assert (p.proto, p.dst, p.dport, p.icmp_type, p.prefix) == (1, "203.0.113.9", None, 8, "internet")


def test_ipv4_options_move_the_transport_header():
    options = b"\x94\x04\0\0" + b"\x01" * 8  # router alert, then NOPs: IHL 8
    p = parse_one(log_msg(ipv4(6, tcp(8080), options=options)))
    assert (p.proto, p.dport, p.length) == (6, 8080, 32 + 20)


def test_tcp_over_ipv6_after_hop_by_hop_and_destination_options():
    packet = ipv6(0, ext(60) + ext(6, units=1) + tcp(22))
    p = parse_one(log_msg(packet, family=socket.AF_INET6, hw_protocol=0x86DD, prefix=b"guard.deny\0"))
    assert p == LoggedPacket(
        6, "guard.deny", 6, "2001:db8::100", "2001:db8::1", 22, None, None, 3, 40 + 24 + 20
    )


def test_icmpv6_echo_after_a_routing_header():
    p = parse_one(log_msg(ipv6(43, ext(58) + icmp(128)), family=socket.AF_INET6, prefix=b"deny_out\0"))
    assert (p.family, p.proto, p.icmp_type, p.dport) == (6, 58, 128, None)


def test_ipv4_fragments_only_the_first_carries_the_port():
    first = parse_one(log_msg(ipv4(17, udp(5353), frag=0x2000)))  # MF, offset 0
    later = parse_one(log_msg(ipv4(17, b"middle of the datagram", frag=0x2000 | 185)))
    assert (first.proto, first.dport) == (17, 5353)
    assert (later.proto, later.dport, later.icmp_type) == (17, None, None)
    assert parse_one(log_msg(ipv4(1, icmp(8), frag=3))).icmp_type is None


def test_ipv6_fragments_only_the_first_carries_the_port():
    first = parse_one(log_msg(ipv6(44, frag6(17, 0, True) + udp(123)), family=socket.AF_INET6))
    later = parse_one(log_msg(ipv6(44, frag6(17, 185, False) + udp(999)), family=socket.AF_INET6))
    assert (first.proto, first.dport) == (17, 123)
    assert (later.proto, later.dport) == (17, None)  # the "udp(999)" there is mid-payload, not a header
    # A later fragment whose first header is destination options: the bytes after the fragment header are the
    # middle of the payload, never walked (here they would read as destination options, then TCP to 22).
    later = parse_one(log_msg(ipv6(44, frag6(60, 185, False) + ext(6) + tcp(22)), family=socket.AF_INET6))
    assert (later.proto, later.dport) == (60, None)


def test_several_packets_in_one_datagram_ending_with_done():
    multi = 0x2  # NLM_F_MULTI
    datagram = (
        log_msg(ipv4(6, tcp(443)))
        + log_msg(ipv6(58, icmp(128)), family=socket.AF_INET6, prefix=b"embedded-ipv4\0")
        + log_msg(ipv4(17, udp(53)), prefix=b"guard.private\0")
        + nlmsg(NLMSG_DONE, struct.pack("=BBH", 0, 0, 0x0200), flags=multi)
    )
    packets, skipped = parse_packets(datagram)
    assert skipped == 0
    assert [(p.family, p.prefix, p.proto) for p in packets] == [
        (4, "deny_out", 6), (6, "embedded-ipv4", 58), (4, "guard.private", 17),
    ]  # fmt: skip


def test_a_slice_of_the_readers_buffer_is_read_in_place():
    datagram = log_msg(ipv4(6, tcp(443)))
    buf = bytearray(1 << 16)
    buf[: len(datagram)] = datagram
    view = memoryview(buf)[: len(datagram)]
    assert is_log_datagram(view)
    assert parse_packets(view)[0][0].dport == 443


def test_other_protocols_keep_their_number():
    p = parse_one(log_msg(ipv4(132, b"\x00\x50\x01\xbb" + b"\0" * 8)))  # SCTP: not TCP/UDP, no port
    assert (p.proto, p.dport, p.icmp_type) == (132, None, None)


def test_family_from_hw_protocol_or_version_when_the_message_has_none():
    netdev = 5  # a netdev table's packet: nfgen_family NFPROTO_NETDEV
    p = parse_one(log_msg(ipv6(6, tcp(80)), family=netdev, hw_protocol=0x86DD))
    assert (p.family, p.dport) == (6, 80)
    assert parse_one(log_msg(ipv4(6, tcp(80)), family=0, hw_protocol=0)).family == 4


def test_prefix_absent_unterminated_long_or_not_utf8():
    assert parse_one(log_msg(ipv4(6, tcp(1)), prefix=None)).prefix == ""
    assert parse_one(log_msg(ipv4(6, tcp(1)), prefix=b"no-nul")).prefix == "no-nul"
    assert parse_one(log_msg(ipv4(6, tcp(1)), prefix=b"a" * 300 + b"\0")).prefix == "a" * 128
    assert parse_one(log_msg(ipv4(6, tcp(1)), prefix=b"\xff\xfe\0junk")).prefix == "\ufffd\ufffd"


# --- cut and malformed ------------------------------------------------------------------------------------


def test_a_copy_cut_before_the_ports_keeps_the_protocol():
    p = parse_one(log_msg(ipv4(6, tcp(443))[:22]))
    assert (p.proto, p.dport, p.length) == (6, None, 40)
    packet = ipv6(0, ext(6, units=4) + tcp(443))  # hop-by-hop (40 bytes), then TCP at 80
    p = parse_one(log_msg(packet[:60], family=socket.AF_INET6))
    assert (p.proto, p.dport, p.length) == (6, None, 100)  # the header names TCP; its ports are cut off
    p = parse_one(log_msg(packet[:45], family=socket.AF_INET6))
    assert (p.proto, p.dport) == (0, None)  # hop-by-hop itself is cut: the protocol is where the walk stopped


def test_a_long_chain_of_extension_headers_is_walked_only_so_far():
    chain = b"".join(ext(60) for _ in range(50)) + tcp(443)
    p = parse_one(log_msg(ipv6(60, chain), family=socket.AF_INET6))
    assert (p.proto, p.dport) == (60, None)


GOOD = log_msg(ipv4(6, tcp(443)))


@pytest.mark.parametrize(
    "bad",
    [
        log_msg(None),  # no payload
        log_msg(b""),  # an empty payload
        log_msg(ipv4(6, tcp(443))[:19]),  # shorter than an IPv4 header
        log_msg(b"\x44" + ipv4(6, tcp(443))[1:]),  # IHL 4
        log_msg(ipv6(6, tcp(443))[:39], family=socket.AF_INET6),  # shorter than an IPv6 header
        log_msg(ipv6(6, tcp(443))),  # AF_INET message, version 6 payload
        log_msg(ipv4(6, tcp(443)), family=socket.AF_INET6),  # and the other way round
        log_msg(b"\x00\x01\x08\x00\x06\x04\x00\x01", family=3, hw_protocol=0x0806),  # ARP
        log_msg(ipv4(6, tcp(443)), outdev=b"\0\0\3"),  # an interface index of 3 bytes
        log_msg(ipv4(6, tcp(443)), indev=b""),
        log_msg(ipv4(6, tcp(443)))[:-4],  # the message claims more than the datagram holds: last message
        nlmsg(LOG_PACKET, b"\x02\x00"),  # body shorter than nfgenmsg
        nlmsg(LOG_PACKET, struct.pack("=BBH", 2, 0, 2) + struct.pack("=HH", 2, 9)),  # attribute len 2
        nlmsg(LOG_PACKET, struct.pack("=BBH", 2, 0, 2) + struct.pack("=HH", 200, 9) + b"\0" * 8),
        nlmsg(0x0401, struct.pack("=BBH", 0, 0, 2)),  # a CONFIG message: not a packet
        struct.pack("=IHHII", 8, LOG_PACKET, 0, 0, 0),  # nlmsg_len below the header's size
        b"\x10\x00\x00",  # not even a header
    ],
)
def test_malformed_messages_are_counted_and_earlier_packets_kept(bad):
    packets, skipped = parse_packets(GOOD + bad)
    assert [p.dport for p in packets] == [443]
    assert skipped == 1


def test_a_malformed_message_in_the_middle_does_not_hide_the_next():
    packets, skipped = parse_packets(GOOD + log_msg(ipv6(6, tcp(1))) + log_msg(ipv4(17, udp(53))))
    assert ([p.dport for p in packets], skipped) == ([443, 53], 1)


def test_an_nftables_event_datagram_is_not_a_log_datagram():
    event = nlmsg(NFT_NEWGEN, struct.pack("=BBH", 0, 0, 0) + nlattr(1, struct.pack("!I", 42)))
    assert not is_log_datagram(event)
    assert parse_packets(event) == ([], 1)
    ack = nlmsg(NLMSG_ERROR, struct.pack("=i", 0) + struct.pack("=IHHII", 20, 0x0401, 5, 9, 0), seq=9)
    assert not is_log_datagram(ack)
    assert not is_log_datagram(b"") and not is_log_datagram(GOOD[:15])
    assert not is_log_datagram(struct.pack("=IHHII", 4, LOG_PACKET, 0, 0, 0))
    assert is_log_datagram(GOOD) and is_log_datagram(memoryview(GOOD))


def datagrams():
    """Valid datagrams of every kind above, to cut and corrupt."""
    return [
        GOOD,
        log_msg(ipv6(0, ext(43) + ext(44) + frag6(6, 0, True) + tcp(22)), family=socket.AF_INET6),
        log_msg(ipv4(1, icmp(8), options=b"\x01" * 40)) + log_msg(ipv4(17, udp(53))) + nlmsg(NLMSG_DONE, b""),
    ]


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_never_raises_on_cut_or_corrupted_datagrams(data):
    datagram = bytearray(data.draw(st.sampled_from(datagrams())))
    for _ in range(data.draw(st.integers(0, 6))):
        datagram[data.draw(st.integers(0, len(datagram) - 1))] = data.draw(st.integers(0, 255))
    datagram = datagram[: data.draw(st.integers(0, len(datagram)))]
    packets, skipped = parse_packets(bytes(datagram))
    assert len(packets) + skipped <= len(datagram) // 16 + 1
    for p in packets:
        assert p.family in (4, 6) and 0 <= p.proto <= 255 and len(p.prefix) <= 128
        assert p.dport is None or 0 <= p.dport <= 0xFFFF


@given(st.binary(max_size=600))
def test_never_raises_on_random_bytes(blob):
    packets, skipped = parse_packets(blob)
    assert isinstance(packets, list) and skipped >= 0
    is_log_datagram(blob)
    parse_packets(struct.pack("=IHHII", 16 + len(blob), LOG_PACKET, 0, 0, 0) + blob)


def test_random_payloads_under_a_valid_frame():
    rng = random.Random(4)
    for _ in range(3000):
        version = rng.choice((0x45, 0x46, 0x4F, 0x60, 0x00))
        payload = bytes([version]) + rng.randbytes(rng.randrange(0, 120))
        parse_packets(log_msg(payload, family=rng.choice((2, 10, 5, 7, 0))))


# --- binding: the request and the ack, against a fake socket ------------------------------------------------


def test_the_config_request_binds_the_group_and_sets_the_copy():
    req = config_request(group=7, copy_range=128, flush_cs=10, qthresh=50, seq=99)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, seq, pid) == (len(req), 0x0401, 99, 0)
    assert flags == 0x1 | 0x4  # NLM_F_REQUEST | NLM_F_ACK
    assert req[16:20] == b"\x00\x00\x00\x07"  # AF_UNSPEC, version 0, res_id = group, big-endian
    attrs, off = {}, 20
    while off < len(req):
        alen, akind = struct.unpack_from("=HH", req, off)
        attrs[akind] = req[off + 4 : off + alen]
        off += (alen + 3) & ~3
    assert attrs[1] == b"\x01"  # NFULA_CFG_CMD: NFULNL_CFG_CMD_BIND
    assert attrs[2] == struct.pack("!IBB", 128, 2, 0)  # NFULA_CFG_MODE: copy_range, NFULNL_COPY_PACKET
    assert attrs[4] == struct.pack("!I", 10) and attrs[5] == struct.pack("!I", 50)  # timeout, qthresh
    assert attrs[6] == b"\x00\x00"  # NFULA_CFG_FLAGS: none
    assert 3 not in attrs  # no NLBUFSIZ: the kernel's default is also its minimum
    settings_only = config_request(7, 128, 10, 50, seq=1, bind=False)
    assert struct.unpack_from("=HH", settings_only, 20)[1] == 2  # no NFULA_CFG_CMD: starts with the mode


def ack(seq: int, code: int = 0, kind: int = 0x0401) -> bytes:
    return nlmsg(
        NLMSG_ERROR, struct.pack("=i", -code) + struct.pack("=IHHII", 40, kind, 5, seq, 1234), seq=seq
    )


def test_ack_code_matches_sequence_and_request_type():
    assert ack_code(ack(5), 5) == 0
    assert ack_code(ack(5, errno.EPERM), 5) == errno.EPERM
    assert ack_code(ack(5), 6) is None
    assert ack_code(ack(5, kind=(10 << 8) | 16), 5) is None  # an ack to an nftables request
    assert ack_code(nlmsg(NFT_NEWGEN, b"\0" * 8, seq=5) + ack(5), 5) == 0
    assert ack_code(ack(5)[:30], 5) is None


class FakeSocket:
    """Answers each request with the scripted datagrams: (sender port, bytes), or an OSError to raise;
    "ACK:<errno>" is replaced by the kernel's ack to the request just sent, "SPOOF:<errno>" by the same ack
    sent from another netlink port (a tenant's process)."""

    def __init__(self, *scripts):
        self.scripts = list(scripts)
        self.sent: list[bytes] = []
        self.queue: list = []
        self.timeout: float | None = 0.0

    def send(self, data):
        self.sent.append(data)
        seq = struct.unpack_from("=I", data, 8)[0]
        script = self.scripts.pop(0) if self.scripts else []
        for item in script:
            if isinstance(item, str):
                kind, code = item.split(":")
                item = ack(seq, int(code)) if kind == "ACK" else (4242, ack(seq, int(code)))
            self.queue.append(item)
        return len(data)

    def recvfrom(self, size):
        if not self.queue:
            raise TimeoutError
        item = self.queue.pop(0)
        if isinstance(item, OSError):
            raise item
        return (item, (0, 0)) if isinstance(item, bytes) else (item[1], (item[0], 0))

    def gettimeout(self):
        return self.timeout

    def settimeout(self, value):
        self.timeout = value


def event() -> bytes:
    return nlmsg(NFT_NEWGEN, struct.pack("=BBH", 0, 0, 0) + nlattr(1, struct.pack("!I", 1)), seq=0)


def test_bind_skips_events_log_datagrams_and_spoofed_acks_and_restores_the_mode():
    sock = FakeSocket([event(), GOOD, OSError(errno.ENOBUFS, "lost"), "SPOOF:1", "ACK:0", event()])
    bind_log_group(sock, 7)  # type: ignore[arg-type]
    assert len(sock.sent) == 1 and sock.timeout == 0.0
    assert sock.queue == [event()]  # what came after the ack is left for the reader


def test_a_group_held_by_another_socket_is_eperm():
    sock = FakeSocket(["ACK:1"])
    with pytest.raises(LogGroupError) as e:
        bind_log_group(sock, 2)  # type: ignore[arg-type]
    assert e.value.errno == errno.EPERM and isinstance(e.value, NetlinkError)
    assert "another netlink socket" in str(e.value)


def test_binding_twice_on_one_socket_applies_the_settings_again():
    sock = FakeSocket(["ACK:16"], ["ACK:0"])  # EBUSY: this socket holds it; then settings only
    bind_log_group(sock, 2, 256)  # type: ignore[arg-type]
    assert len(sock.sent) == 2
    kinds = [struct.unpack_from("=HH", r, 20)[1] for r in sock.sent]
    assert kinds == [1, 2]  # the first request starts with NFULA_CFG_CMD, the second with NFULA_CFG_MODE
    assert struct.unpack_from("=I", sock.sent[0], 8) != struct.unpack_from("=I", sock.sent[1], 8)


def test_no_answer_times_out_and_a_socket_error_is_reported():
    sock = FakeSocket([event()])
    with pytest.raises(LogGroupError) as e:
        bind_log_group(sock, 2, timeout=0.05)  # type: ignore[arg-type]
    assert e.value.errno is None and sock.timeout == 0.0
    with pytest.raises(LogGroupError) as e:
        bind_log_group(FakeSocket([OSError(errno.EBADF, "bad")]), 2)  # type: ignore[arg-type]
    assert e.value.errno == errno.EBADF


@pytest.mark.parametrize("args", [(-1,), (65536,), (2, 0), (2, 63), (2, 4097), (2, 128, -1), (2, 128, 10, 0)])
def test_bad_arguments_are_refused_before_anything_is_sent(args):
    sock = FakeSocket()
    names = ("group", "copy_range", "flush_cs", "qthresh")
    with pytest.raises(ValueError):
        bind_log_group(sock, **dict(zip(names, args, strict=False)))  # type: ignore[arg-type]
    assert sock.sent == []
