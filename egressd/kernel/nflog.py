"""Denied packets, as the kernel logs them: nfnetlink_log ("NFLOG") on the socket that hears nftables events.

The sandbox table logs what it denies with `log prefix "<step>" group G`. The kernel queues a copy of each
such packet (its first copy_range bytes, and metadata) for the one netlink socket bound to group G in that
namespace, and sends the queue as one datagram when QTHRESH packets wait or FLUSH_CS has passed. egressd
already keeps one NETLINK_NETFILTER socket per sandbox namespace for nftables events (monitor_socket.py);
that same socket is bound to the log group, so logging costs no second descriptor and no second reader: the
event loop tells the two kinds of datagram apart by the subsystem of the first message (is_log_datagram) and
hands log ones to parse_packets. How often a sandbox may log is limited in its kernel rule (`limit rate`),
never here: a packet over the limit is never copied, queued or sent. The price of one socket:
log datagrams and events share its receive buffer, so a flood of logs that fills it makes the kernel drop
events too, which the monitor then sees as ENOBUFS (lost events) and answers by checking the table.

A group has one listener per namespace: binding a group that another socket holds fails with EPERM (the
kernel checks the holder's port before anything else; EBUSY only means this very socket holds it already).
The binding lasts as long as the socket: closing it (NETLINK_URELEASE) frees the group at once. The old
per-family PF_BIND/PF_UNBIND commands are not sent, and not needed: since 3.17 nf_tables' `log group` names
its logger type (ULOG) itself, which nfnetlink_log serves for every family; PF_BIND, still honoured, would
only make nfnetlink_log the namespace's *default* logger (/proc/sys/net/netfilter/nf_log/<pf>), which is the
sandbox's business (tests/integration/test_nflog.py: packets arrive without it, and nf_log stays as it was).

Everything parsed here is hostile input. A tenant with CAP_NET_ADMIN in its namespace chooses the packets
(any bytes in any header), can add its own `log group G` rules with any prefix (so a prefix names the step
only if egressd's rule logged the packet: it is a hint, never proof), can bind the group first (EPERM for
egressd), and can send netlink messages to the socket (the caller drops those whose sender port is not 0,
the kernel's; bind_log_group does the same). Parsing never raises, never reads past a length, and does work
linear in the datagram's size; a message it cannot read is counted and skipped.

Constants are checked against linux/netfilter/nfnetlink_log.h and net/netfilter/nfnetlink_log.c (and against
this kernel: tests/integration/test_nflog.py).
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass

from egressd.kernel.nfnl import (
    NFGENMSG,
    NFNETLINK_V0,
    NLM_F_ACK,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    RECV_BUFFER,
    TIMEOUT_S,
    NetlinkError,
    Unframed,
    attr,
    attributes,
    frames,
    listening_socket,
)

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET, NFULNL_MSG_CONFIG = 0, 1
# NFULA_CFG_*: the attributes of a CONFIG message
NFULA_CFG_CMD, NFULA_CFG_MODE, NFULA_CFG_TIMEOUT, NFULA_CFG_QTHRESH, NFULA_CFG_FLAGS = 1, 2, 4, 5, 6
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
# NFULA_*: the attributes of a PACKET message
NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV = 1, 4, 5
NFULA_PAYLOAD, NFULA_PREFIX = 9, 10
PACKET_ATTRS = (NFULA_PACKET_HDR, NFULA_IFINDEX_INDEV, NFULA_IFINDEX_OUTDEV, NFULA_PAYLOAD, NFULA_PREFIX)
MODE = struct.Struct("!IBB")  # nfulnl_msg_config_mode, packed: copy_range (be32), copy_mode, pad
CONFIG_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
_SEQ = itertools.count(0x6C670000)  # CONFIG requests' sequence numbers: a late ack never answers a later one

# The kernel queues log messages for up to FLUSH_CS hundredths of a second (its default is 100), or QTHRESH of
# them, in one datagram of at most NLMSG_GOODSIZE (one page) unless one message is bigger: with copy_range at
# most COPY_RANGE_MAX, every datagram of egressd's rules fits the reader's 64 KiB buffer (a tenant's own rule
# with a larger snaplen may not: read as truncated, and checked). A tenth of a second: an event's time
# is within it of its packet's, and a flood wakes the agent at most ten times a second per namespace.
FLUSH_CS = 10
QTHRESH = 100
COPY_RANGE_MIN = 64  # an IPv4 header with options (60) and the 4 bytes of ports after it
COPY_RANGE_MAX = 4096
PREFIX_MAX = 128  # NF_LOG_PREFIXLEN, with its NUL
IPV6_EXT_MAX = 8  # extension headers walked at most; beyond, the protocol is the header reached
AF_INET, AF_INET6 = 2, 10  # nfgen_family of a packet message (NFPROTO_IPV4, NFPROTO_IPV6)
ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD  # hw_protocol in NFULA_PACKET_HDR
TCP, UDP, ICMP, ICMPV6 = 6, 17, 1, 58
HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS = 0, 43, 44, 51, 60

_ERRORS = {
    errno.EPERM: "another netlink socket in this namespace holds it (or this one lacks CAP_NET_ADMIN there)",
    errno.EINVAL: "the kernel found the request malformed",
}


class LogGroupError(NetlinkError):
    """Binding a log group failed; errno is the kernel's answer, or None (no answer, or a socket error)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.errno = code


@dataclass(frozen=True)
class LoggedPacket:
    """One logged packet. proto is the upper-layer protocol (IPv6: after its extension headers, or the last
    header reached); dport is for TCP and UDP only, icmp_type for ICMP and ICMPv6 only, both None when the
    packet is a fragment other than the first or the copy ends first; length is the IP length the header
    declares (the copy holds at most copy_range bytes of it)."""

    family: int  # 4 or 6
    prefix: str
    proto: int
    src: str
    dst: str
    dport: int | None
    icmp_type: int | None
    indev: int | None
    outdev: int | None
    length: int


def config_request(
    group: int, copy_range: int, flush_cs: int, qthresh: int, seq: int, bind: bool = True
) -> bytes:
    """A CONFIG message for group: BIND (unless bind is False: settings only), copy each packet's first
    copy_range bytes, flush after flush_cs hundredths of a second or qthresh packets, no flags (no sequence
    numbers, no conntrack: nothing the kernel must add to each message)."""
    body = struct.pack("=BB", socket.AF_UNSPEC, NFNETLINK_V0) + struct.pack("!H", group)  # res_id: the group
    if bind:
        body += attr(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
    body += (
        attr(NFULA_CFG_MODE, MODE.pack(copy_range, NFULNL_COPY_PACKET, 0))
        + attr(NFULA_CFG_TIMEOUT, struct.pack("!I", flush_cs))
        + attr(NFULA_CFG_QTHRESH, struct.pack("!I", qthresh))
        + attr(NFULA_CFG_FLAGS, struct.pack("!H", 0))
    )
    flags = NLM_F_REQUEST | NLM_F_ACK
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), CONFIG_TYPE, flags, seq & 0xFFFFFFFF, 0) + body


def ack_code(data: bytes, seq: int) -> int | None:
    """The errno of the ack to our CONFIG request with seq in a datagram (0: done), or None when the datagram
    holds none (an nftables event, a log datagram, anything malformed)."""
    try:
        for kind, _, mseq, body in frames(data):
            if kind == NLMSG_ERROR and mseq == seq and len(body) >= 4 + NLMSGHDR.size:
                code = -struct.unpack_from("=i", body)[0]
                if NLMSGHDR.unpack_from(body, 4)[1] == CONFIG_TYPE and code >= 0:
                    return code
    except Unframed:
        return None
    return None


def _await_ack(sock: socket.socket, seq: int, deadline: float) -> int:
    """Read until the ack to our request seq; anything else (events, log datagrams) is dropped."""
    old = sock.gettimeout()
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise LogGroupError("no answer from the kernel in time")
            sock.settimeout(left)
            try:
                data, (sender, _) = sock.recvfrom(RECV_BUFFER)
            except TimeoutError:
                continue  # the deadline check above ends it
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    continue  # events lost: the caller's generation read afterwards accounts for them
                raise LogGroupError(f"netlink socket failed: {e.strerror}", e.errno) from None
            if sender == 0:
                code = ack_code(data, seq)
                if code is not None:
                    return code
    finally:
        sock.settimeout(old)


def _configure(sock: socket.socket, request: bytes, seq: int, deadline: float) -> int:
    """Send one CONFIG request and return the kernel's errno in its ack (0: done)."""
    try:
        sock.send(request)
    except OSError as e:
        raise LogGroupError(f"cannot send to the kernel: {e.strerror}", e.errno) from None
    return _await_ack(sock, seq, deadline)


def bind_log_group(
    sock: socket.socket,
    group: int,
    copy_range: int = 128,
    *,
    flush_cs: int = FLUSH_CS,
    qthresh: int = QTHRESH,
    timeout: float = TIMEOUT_S,
) -> None:
    """Make sock, a bound NETLINK_NETFILTER socket, the listener of log group `group` in its namespace.

    Works on a blocking, timeout or non-blocking socket (its mode is restored); events and log datagrams
    read meanwhile are dropped (read the ruleset generation afterwards). Idempotent on one socket. Raises
    ValueError for bad arguments, LogGroupError (a NetlinkError) with the kernel's errno: EPERM when
    another socket in the namespace holds the group."""
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"log group {group} is not 0-65535")
    if not COPY_RANGE_MIN <= copy_range <= COPY_RANGE_MAX:
        raise ValueError(f"copy_range {copy_range} is not {COPY_RANGE_MIN}-{COPY_RANGE_MAX}")
    if not (0 <= flush_cs <= 0xFFFFFFFF and 1 <= qthresh <= 0xFFFFFFFF):
        raise ValueError(f"flush_cs {flush_cs} or qthresh {qthresh} out of range")
    deadline = time.monotonic() + timeout

    def ask(bind: bool) -> int:
        seq = next(_SEQ) & 0xFFFFFFFF
        request = config_request(group, copy_range, flush_cs, qthresh, seq, bind)
        return _configure(sock, request, seq, deadline)

    code = ask(bind=True)
    if code == errno.EBUSY:  # this socket holds the group already (a retry): apply the settings only
        code = ask(bind=False)
    if code != 0:
        meaning = _ERRORS.get(code, "the kernel refused it")
        raise LogGroupError(f"cannot bind log group {group}: {meaning} ({os.strerror(code)})", code)


def is_log_datagram(buf: memoryview | bytes) -> bool:
    """Whether a datagram's first message is nfnetlink_log's (subsystem ULOG), not an nftables event."""
    if len(buf) < NLMSGHDR.size:
        return False
    length, kind = struct.unpack_from("=IH", buf, 0)
    return length >= NLMSGHDR.size and kind >> 8 == NFNL_SUBSYS_ULOG


def parse_packets(buf: memoryview | bytes) -> tuple[list[LoggedPacket], int]:
    """The packets of a log datagram, and how many messages were skipped: malformed, not a packet message,
    not an IPv4 or IPv6 packet. Control messages (the NLMSG_DONE ending a batch) are not counted. Never
    raises; the work is linear in len(buf)."""
    packets: list[LoggedPacket] = []
    skipped = 0
    try:
        for kind, _, _, body in frames(buf):
            if kind == PACKET_TYPE:
                packet = _packet(body)
                if packet is None:
                    skipped += 1
                else:
                    packets.append(packet)
            elif kind >= 0x10:  # not NLMSG_NOOP/ERROR/DONE/OVERRUN
                skipped += 1
    except Unframed:
        skipped += 1  # the rest cannot be framed
    return packets, skipped


def _packet(body: memoryview) -> LoggedPacket | None:
    """One PACKET message (nfgenmsg and attributes); None when it is not a readable IP packet log."""
    if len(body) < NFGENMSG.size:
        return None
    try:
        attrs = attributes(body[NFGENMSG.size :], PACKET_ATTRS)
    except ValueError:
        return None
    payload = attrs.get(NFULA_PAYLOAD)
    if payload is None or not payload:
        return None
    family = _family(body[0], attrs.get(NFULA_PACKET_HDR), payload[0] >> 4)
    if family is None:
        return None
    indev, outdev = attrs.get(NFULA_IFINDEX_INDEV), attrs.get(NFULA_IFINDEX_OUTDEV)
    if (indev is not None and len(indev) != 4) or (outdev is not None and len(outdev) != 4):
        return None
    ip = _ipv4(payload) if family == 4 else _ipv6(payload)
    if ip is None:
        return None
    proto, src, dst, length, dport, icmp_type = ip
    prefix = bytes(attrs.get(NFULA_PREFIX, b"")[:PREFIX_MAX]).split(b"\0", 1)[0].decode("utf-8", "replace")
    return LoggedPacket(
        family, prefix, proto, src, dst, dport, icmp_type, _ifindex(indev), _ifindex(outdev), length
    )


def _family(nfgen_family: int, hdr: memoryview | None, version: int) -> int | None:
    """4 or 6: from the message's family (an inet, ip or ip6 table), else from the packet header's
    hw_protocol (a netdev or bridge table), else from the version nibble; it must agree with the nibble."""
    if nfgen_family == AF_INET:
        family = 4
    elif nfgen_family == AF_INET6:
        family = 6
    elif hdr is not None and len(hdr) >= 2 and struct.unpack_from("!H", hdr)[0] in (ETH_P_IP, ETH_P_IPV6):
        family = 4 if struct.unpack_from("!H", hdr)[0] == ETH_P_IP else 6
    else:
        family = version
    return family if family == version and family in (4, 6) else None


def _ifindex(value: memoryview | None) -> int | None:
    """An interface index attribute (be32, its length checked); None when absent."""
    return None if value is None else struct.unpack("!I", value)[0]


_IP = tuple[int, str, str, int, int | None, int | None]  # proto, src, dst, length, dport, icmp_type


def _ipv4(p: memoryview) -> _IP | None:
    """An IPv4 header (with its options: IHL) and the start of what it carries."""
    ihl = (p[0] & 0x0F) * 4
    if len(p) < 20 or ihl < 20:
        return None
    total, _, frag = struct.unpack_from("!HHH", p, 2)  # total length, identification, flags and offset
    proto = p[9]
    src, dst = socket.inet_ntop(socket.AF_INET, p[12:16]), socket.inet_ntop(socket.AF_INET, p[16:20])
    first = frag & 0x1FFF == 0
    dport, icmp_type = _l4(p, ihl, proto, first, ICMP)
    return proto, src, dst, total, dport, icmp_type


def _ipv6(p: memoryview) -> _IP | None:
    """An IPv6 header, its extension headers walked (at most IPV6_EXT_MAX) to the upper-layer protocol."""
    if len(p) < 40:
        return None
    length = 40 + struct.unpack_from("!H", p, 4)[0]
    src, dst = socket.inet_ntop(socket.AF_INET6, p[8:24]), socket.inet_ntop(socket.AF_INET6, p[24:40])
    proto, off, first = p[6], 40, True
    for _ in range(IPV6_EXT_MAX):
        if proto not in (HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS) or off + 8 > len(p):
            break  # not an extension header, or it is cut off: proto is the last header reached
        nxt = p[off]
        if proto == FRAGMENT:
            first = struct.unpack_from("!H", p, off + 2)[0] >> 3 == 0
            size = 8
        elif proto == AH:
            size = (p[off + 1] + 2) * 4
        else:
            size = (p[off + 1] + 1) * 8
        proto, off = nxt, off + size
        if not first:
            break  # a later fragment: what follows its header is the middle of the payload
    if proto in (HOPOPTS, ROUTING, FRAGMENT, AH, DSTOPTS):
        return proto, src, dst, length, None, None
    dport, icmp_type = _l4(p, off, proto, first, ICMPV6)
    return proto, src, dst, length, dport, icmp_type


def _l4(p: memoryview, off: int, proto: int, first: bool, icmp: int) -> tuple[int | None, int | None]:
    """(dport, icmp_type) at off, when the copy holds them and this is the first fragment."""
    if not first:
        return None, None
    if proto in (TCP, UDP) and off + 4 <= len(p):
        return struct.unpack_from("!H", p, off + 2)[0], None
    if proto == icmp and off + 1 <= len(p):
        return None, p[off]
    return None, None


def open_log_socket(group: int, rcvbuf: int = 1 << 20) -> socket.socket:
    """A non-blocking socket in this process's own namespace, the listener of log group `group` there (the
    host-side guard table's denials). Raises OSError or LogGroupError (EPERM: another socket holds it)."""
    sock = listening_socket(rcvbuf)
    try:
        bind_log_group(sock, group)
    except (OSError, NetlinkError):
        sock.close()
        raise
    return sock
