"""nf_tables over raw netlink: the one read a restart needs (the fingerprint), without libnftables; for
the sandbox's own table and for the host side's (family netdev, in egressd's own namespace).

A libnftables context costs about 0.3 ms to make and its calls share one process-wide lock (1.0.6 is not
thread-safe). Adopting a table on restart needs only the comment of one rule, so it is read here with a
transient NETLINK_NETFILTER socket made inside the namespace: a filtered GETRULE dump, parsed in a few lines,
with no lock and no cache. Anything unexpected in the reply is an error, never a fingerprint: the caller then
falls back to reading the table with libnftables.

Constants are checked against linux/netlink.h, linux/netfilter/nfnetlink.h, linux/netfilter/nf_tables.h and
libnftnl's udata.h (and against this kernel: tests/integration/test_nfnl.py).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator
from typing import TypeVar

from egressd.kernel.netns import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_DUMP = 0x300  # NLM_F_ROOT | NLM_F_MATCH
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_MIN_TYPE = 0x10  # types below are netlink control messages (error, done, overrun)
NFPROTO_INET = 1
NFPROTO_NETDEV = 5
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11
NLA_F_NESTED = 0x8000
NFNETLINK_V0 = 0
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFT_MSG_NEWRULE = 6
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_GEN_ID = 1
NFT_MSG_GETRULE = 7
NFTA_RULE_TABLE = NFTA_TABLE_NAME = 1
NFTA_RULE_CHAIN = 2
NFTA_RULE_USERDATA = 7
NFTNL_UDATA_RULE_COMMENT = 0  # libnftnl: rule userdata is {u8 type, u8 len, value} records
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED and NLA_F_NET_BYTEORDER

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NLATTR = struct.Struct("=HH")  # len, type
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (big-endian, 0 here)
RECV_BUFFER = 1 << 16
TIMEOUT_S = 2.0  # a dump of one chain answers in microseconds; a hung kernel must not hang a worker


class NetlinkError(Exception):
    """The reply could not be read or made no sense; the caller reads the table another way."""


def align(n: int) -> int:
    return (n + 3) & ~3


class Unframed(ValueError):
    """The next netlink message of a datagram cannot be framed: what follows it cannot be read either."""


def frames(data: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, int, memoryview]]:
    """Each netlink message of one datagram, in order: (type, flags, sequence number, body after the
    header). Raises Unframed at the first one that cannot be framed (a truncated header, a length below the
    header's or beyond the datagram), after yielding those before it. The one walk every reader of netlink
    replies, events and log datagrams shares; each keeps its own policy for what cannot be framed."""
    view = memoryview(data).cast("B")
    off, end, size = 0, len(view), NLMSGHDR.size
    while off < end:
        if end - off < size:
            raise Unframed("truncated netlink header")
        length, kind, flags, seq, _ = NLMSGHDR.unpack_from(view, off)
        if length < size or length > end - off:
            raise Unframed(f"netlink length {length}")
        yield kind, flags, seq, view[off + size : off + length]
        off += align(length)


def attributes(data: memoryview, wanted: tuple[int, ...]) -> dict[int, memoryview]:
    """The wanted top-level attributes of a netlink message body; ValueError when the body is malformed."""
    out: dict[int, memoryview] = {}
    off = 0
    end = len(data)
    while off < end:
        if end - off < NLATTR.size:
            raise ValueError("truncated attribute header")
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size or off + length > end:
            raise ValueError(f"attribute length {length}")
        kind &= NLA_TYPE_MASK
        if kind in wanted and kind not in out:
            out[kind] = data[off + NLATTR.size : off + length]
        off += align(length)
    return out


def each_attribute(data: memoryview) -> Iterator[tuple[int, memoryview]]:
    """Every attribute of a body or nested list, in order (a list repeats one type: attributes() would
    keep only its first); ValueError when the body is malformed."""
    off = 0
    while off + NLATTR.size <= len(data):
        length, kind = NLATTR.unpack_from(data, off)
        if length < NLATTR.size or off + length > len(data):
            raise ValueError(f"attribute length {length}")
        yield kind & NLA_TYPE_MASK, data[off + NLATTR.size : off + length]
        off += align(length)


def attr(kind: int, value: bytes) -> bytes:
    body = NLATTR.pack(NLATTR.size + len(value), kind) + value
    return body + b"\0" * (align(len(body)) - len(body))


def nested(kind: int, payload: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, payload)


def batch_marker(kind: int, seq: int) -> bytes:
    """The begin or end message of an nf_tables batch: its nfgenmsg is AF_UNSPEC, and res_id names the
    subsystem, big-endian."""
    body = struct.pack("=BB", 0, NFNETLINK_V0) + struct.pack("!H", NFNL_SUBSYS_NFTABLES)
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST, seq, 0) + body


def getrule_dump_request(table: str, chain: str, seq: int, family: int = NFPROTO_INET) -> bytes:
    """A GETRULE dump of one chain: the kernel filters by table and chain, so only its rules come back."""
    body = (
        NFGENMSG.pack(family, NFNETLINK_V0, 0)
        + attr(NFTA_RULE_TABLE, table.encode() + b"\0")
        + attr(NFTA_RULE_CHAIN, chain.encode() + b"\0")
    )
    kind = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETRULE
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + body


def rule_comment(userdata: memoryview) -> str | None:
    """The comment record of a rule's userdata (what `nft add rule ... comment "x"` stores)."""
    off = 0
    while off + 2 <= len(userdata):
        kind, length = userdata[off], userdata[off + 1]
        value = userdata[off + 2 : off + 2 + length]
        if len(value) != length:
            raise ValueError("truncated rule userdata")
        if kind == NFTNL_UDATA_RULE_COMMENT:
            return bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
        off += 2 + length
    return None


class DumpReader:
    """The frame of a dump reply: the messages of one request, until NLMSG_DONE; `missing` when the kernel
    says the object is not there (ENOENT). A subclass names the message type it reads (`kind`) and reads
    each (`message`). strict: a message of another sequence number is an error (a socket made for one
    read); otherwise it is skipped (a kept socket may still hold answers to an earlier request)."""

    kind = -1
    strict = True

    def __init__(self, seq: int, strict: bool | None = None) -> None:
        self.seq = seq
        self.done = False
        self.missing = False
        if strict is not None:
            self.strict = strict

    def message(self, body: memoryview) -> None:
        """One object message, its nfgenmsg header off; ValueError when malformed."""
        raise NotImplementedError

    def feed(self, data: bytes) -> None:
        """One datagram of the reply; NetlinkError for anything this reader does not expect."""
        try:
            for kind, _, seq, body in frames(data):
                if self.done:
                    return
                self._one(kind, seq, body)
        except Unframed as e:
            if not self.done:
                raise NetlinkError(f"malformed reply: {e}") from None

    def _one(self, kind: int, seq: int, body: memoryview) -> None:
        """One message of the reply."""
        if seq != self.seq:
            if self.strict:
                raise NetlinkError(f"reply to another request (sequence {seq}, expected {self.seq})")
            return
        if kind == NLMSG_DONE:
            self.done = True
        elif kind == NLMSG_ERROR:
            code = -struct.unpack_from("=i", body)[0] if len(body) >= 4 else -1
            if code == errno.ENOENT:
                self.missing = self.done = True
            elif code != 0:
                raise NetlinkError(f"kernel refused the dump: {os.strerror(code)}")
        elif kind == NLMSG_NOOP:
            return
        elif kind == (NFNL_SUBSYS_NFTABLES << 8) | self.kind:
            try:
                self.message(body[NFGENMSG.size :])
            except ValueError as e:
                raise NetlinkError(f"malformed object in reply: {e}") from None
        else:
            raise NetlinkError(f"unexpected message type {kind:#x} in reply")


class DumpParser(DumpReader):
    """Collects the comments of the rules in a GETRULE dump reply, in order."""

    kind = NFT_MSG_NEWRULE

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.comments: list[str | None] = []

    def message(self, body: memoryview) -> None:
        data = attributes(body, (NFTA_RULE_USERDATA,)).get(NFTA_RULE_USERDATA)
        self.comments.append(None if data is None else rule_comment(data))


def netfilter_socket() -> socket.socket:
    """Made inside the target namespace (the socket stays bound to it)."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        sock.bind((0, 0))
        sock.settimeout(TIMEOUT_S)
    except OSError:
        sock.close()
        raise
    return sock


def chain_comments(
    sock: socket.socket, table: str, chain: str, seq: int = 1, family: int = NFPROTO_INET
) -> list[str | None] | None:
    """Comments of every rule of `family table chain`, in order; None when the table or chain is missing."""
    parser = exchange(sock, getrule_dump_request(table, chain, seq, family), DumpParser(seq))
    return None if parser.missing else parser.comments


R = TypeVar("R", bound=DumpReader)


def exchange(sock: socket.socket, request: bytes, reader: R) -> R:
    """One request sent, and its reply fed to reader until it is done; NetlinkError for any failure."""
    try:
        sock.sendall(request)
        while not reader.done:
            data = sock.recv(RECV_BUFFER)
            if not data:
                raise NetlinkError("netlink socket closed during the dump")
            reader.feed(data)
    except OSError as e:  # timeout included
        raise NetlinkError(f"netlink dump failed: {e}") from None
    return reader


def _read_socket(path: str | None, setns: Callable[[int, int], int] | None) -> socket.socket:
    """A socket for one read in the namespace at path (None: egressd's own). Raises NetnsError or
    NetlinkError."""
    try:
        return netfilter_socket() if path is None else in_netns(path, netfilter_socket, setns)[0]
    except OSError as e:
        raise NetlinkError(f"cannot open a netlink socket in {path or 'our namespace'}: {e}") from None


def read_chain_comments(
    path: str | None,
    table: str,
    chain: str,
    setns: Callable[[int, int], int] | None = None,
    family: int = NFPROTO_INET,
) -> list[str | None] | None:
    """chain_comments() in the namespace at path (None: egressd's own), on a socket made for this read only.

    Raises NetnsError (path unusable) or NetlinkError."""
    with _read_socket(path, setns) as sock:
        return chain_comments(sock, table, chain, family=family)


class _Present(DumpReader):
    """The reply to a plain GET of one table: the table (one message), or ENOENT."""

    kind = NFT_MSG_NEWTABLE

    def message(self, body: memoryview) -> None:
        self.done = True


class _Generation(DumpReader):
    """The reply to GETGEN: the namespace's ruleset generation, which every committed transaction bumps."""

    kind = NFT_MSG_NEWGEN

    def __init__(self, seq: int, strict: bool | None = None) -> None:
        super().__init__(seq, strict)
        self.generation = -1

    def message(self, body: memoryview) -> None:
        value = attributes(body, (NFTA_GEN_ID,)).get(NFTA_GEN_ID)
        if value is None or len(value) != 4:
            raise ValueError("NEWGEN without a generation id")
        self.generation = struct.unpack("!I", value)[0]
        self.done = True


def _get(kind: int, family: int, seq: int, attrs: bytes = b"") -> bytes:
    payload = NFGENMSG.pack(family, NFNETLINK_V0, 0) + attrs
    return (
        NLMSGHDR.pack(NLMSGHDR.size + len(payload), (NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_REQUEST, seq, 0)
        + payload
    )


def ruleset_generation(sock: socket.socket, seq: int = 1, strict: bool = True) -> int:
    """The ruleset generation of the namespace sock was made in. strict=False: messages of other sequence
    numbers are skipped (a kept socket, or one that hears events). Raises NetlinkError."""
    return exchange(sock, _get(NFT_MSG_GETGEN, 0, seq), _Generation(seq, strict)).generation


def table_presence(
    sock: socket.socket, table: str, seq: int, family: int = NFPROTO_INET, strict: bool = True
) -> tuple[bool, int]:
    """(whether `family table` is in sock's namespace, the namespace's ruleset generation read just before),
    with sequence numbers seq and seq + 1. The generation lets the change monitor tell, once it listens,
    whether any commit but egressd's next one happened since. Raises NetlinkError."""
    generation = ruleset_generation(sock, seq, strict)
    request = _get(NFT_MSG_GETTABLE, family, seq + 1, attr(NFTA_TABLE_NAME, table.encode() + b"\0"))
    return not exchange(sock, request, _Present(seq + 1, strict)).missing, generation


SO_RCVBUFFORCE = 33  # socket.h; needs CAP_NET_ADMIN, falls back to SO_RCVBUF (capped by rmem_max)


def listening_socket(rcvbuf: int) -> socket.socket:
    """A bound, non-blocking NETLINK_NETFILTER socket in the calling thread's namespace, with a receive
    buffer of rcvbuf (what the kernel sends it waits there): the change monitor's and the denials' log."""
    sock = socket.socket(
        socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, NETLINK_NETFILTER
    )
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.bind((0, 0))
    except OSError:
        sock.close()
        raise
    return sock
