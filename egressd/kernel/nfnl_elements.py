"""Learned addresses into a set over raw netlink: the write that stands between a sandbox's DNS answer and
its reply, so it must be short.

libnftables spends about 1.2 ms on a learned-set write (a context's cache load, JSON parsing, the global
lock every call shares); the kernel's part is a few tens of microseconds. Here one nf_tables batch is built
by hand (add, delete, add for each set: the one way that sets the timeout of an element already there on
every kernel, as ruleset/transactions.learn_commands does) and sent over a NETLINK_NETFILTER socket made
inside the namespace and kept (ElementSocket). Every message asks for an acknowledgement; the batch
applies whole or not at all, and any error (a set or table that is gone) is an ApplyError, so the
sandbox gets SERVFAIL.

Constants are checked against linux/netfilter/nf_tables.h and nfnetlink.h (and against this kernel:
tests/integration/test_nfnl.py).
"""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Mapping

from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import in_netns
from egressd.kernel.nfnl import (
    NFGENMSG,
    NFNETLINK_V0,
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFNL_SUBSYS_NFTABLES,
    NFPROTO_INET,
    NFPROTO_NETDEV,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_ERROR,
    NLMSGHDR,
    RECV_BUFFER,
    DumpReader,
    NetlinkError,
    Unframed,
    attr,
    attributes,
    batch_marker,
    each_attribute,
    frames,
    nested,
    netfilter_socket,
)

NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFTA_SET_ELEM_LIST_TABLE = 1
NFTA_SET_ELEM_LIST_SET = 2
NFTA_SET_ELEM_LIST_ELEMENTS = 3
NFTA_LIST_ELEM = 1
NFTA_SET_ELEM_KEY = 1
NFTA_SET_ELEM_TIMEOUT = 4
NFTA_SET_ELEM_EXPIRATION = 5
NFT_MSG_GETSETELEM = 13
NFTA_DATA_VALUE = 1
FAMILIES = {"inet": NFPROTO_INET, "netdev": NFPROTO_NETDEV}


def _message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def _elements(addresses: list[str], timeouts: Mapping[str, int] | None) -> bytes:
    out = b""
    for a in addresses:
        key = nested(NFTA_SET_ELEM_KEY, attr(NFTA_DATA_VALUE, ipaddress.ip_address(a).packed))
        if timeouts is not None:
            key += attr(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", int(timeouts[a]) * 1000))
        out += nested(NFTA_LIST_ELEM, key)
    return out


def _naming(family: str, table: str, name: str) -> bytes:
    """The head of every set element message: the family, the table and the set."""
    head = NFGENMSG.pack(FAMILIES[family], NFNETLINK_V0, 0) + attr(
        NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0"
    )
    return head + attr(NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0")


def learn_batch(
    family: str, table: str, sets: tuple[str, str], timeouts: Mapping[str, int], seq: int
) -> tuple[bytes, list[int]]:
    """The batch (begin, add/delete/add per non-empty set, end) and the sequence numbers to be
    acknowledged. sets: the IPv4 set, the IPv6 set. Timeouts in seconds."""
    out = [batch_marker(NFNL_MSG_BATCH_BEGIN, seq)]
    acked: list[int] = []
    for version, name in zip((4, 6), sets, strict=True):
        addrs = sorted(a for a in timeouts if (":" in a) == (version == 6))
        if not addrs:
            continue
        where = _naming(family, table, name)
        steps = (
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE, timeouts),
            (NFT_MSG_DELSETELEM, 0, None),
            (NFT_MSG_NEWSETELEM, NLM_F_CREATE, timeouts),
        )
        for msg, flags, timed in steps:
            seq += 1
            body = where + nested(NFTA_SET_ELEM_LIST_ELEMENTS, _elements(addrs, timed))
            out.append(
                _message((NFNL_SUBSYS_NFTABLES << 8) | msg, NLM_F_REQUEST | NLM_F_ACK | flags, seq, body)
            )
            acked.append(seq)
    out.append(batch_marker(NFNL_MSG_BATCH_END, seq + 1))
    return b"".join(out), acked


class AckReader:
    """Reads the acknowledgements of one batch: `done` once each message is acknowledged, `error` (an
    errno) for the first refusal, whether of a message or of the whole batch (its begin marker's seq)."""

    def __init__(self, begin: int, acked: list[int]) -> None:
        self.begin = begin
        self.pending = set(acked)
        self.error = 0

    @property
    def done(self) -> bool:
        return not self.pending

    def feed(self, data: bytes) -> None:
        try:
            for kind, _, seq, body in frames(data):
                self._one(kind, seq, body)
        except Unframed as e:
            raise ValueError(f"malformed reply: {e}") from None

    def _one(self, kind: int, seq: int, body: memoryview) -> None:
        if kind != NLMSG_ERROR or len(body) < 4:
            return  # nothing else is asked for; a stray message is not an answer
        code = -struct.unpack_from("=i", body)[0]
        if seq == self.begin and code:
            self.error = self.error or code
            self.pending.clear()  # the batch as a whole was refused: no more answers come
        elif seq in self.pending:
            self.pending.discard(seq)
            self.error = self.error or code


def getsetelem_request(family: str, table: str, name: str, seq: int) -> bytes:
    """A dump of one set's elements."""
    body = NFGENMSG.pack(FAMILIES[family], NFNETLINK_V0, 0)
    body += attr(NFTA_SET_ELEM_LIST_TABLE, table.encode() + b"\0") + attr(
        NFTA_SET_ELEM_LIST_SET, name.encode() + b"\0"
    )
    return _message((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETSETELEM, NLM_F_REQUEST | NLM_F_DUMP, seq, body)


class ElementReader(DumpReader):
    """Collects address -> seconds left from a GETSETELEM dump reply, on a kept socket (not strict)."""

    kind = NFT_MSG_NEWSETELEM
    strict = False

    def __init__(self, seq: int) -> None:
        super().__init__(seq)
        self.left: dict[str, int] = {}

    def message(self, body: memoryview) -> None:
        self._elements(body)

    def _elements(self, body: memoryview) -> None:
        listed = attributes(body, (NFTA_SET_ELEM_LIST_ELEMENTS,)).get(NFTA_SET_ELEM_LIST_ELEMENTS)
        for _, elem in each_attribute(listed if listed is not None else memoryview(b"")):
            inner = attributes(elem, (NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_EXPIRATION))
            key = inner.get(NFTA_SET_ELEM_KEY)
            value = attributes(key, (NFTA_DATA_VALUE,)).get(NFTA_DATA_VALUE) if key is not None else None
            if value is None or len(value) not in (4, 16):
                raise ValueError("an element without an address key")
            expiration = inner.get(NFTA_SET_ELEM_EXPIRATION)
            ms = struct.unpack("!Q", expiration)[0] if expiration is not None and len(expiration) == 8 else 0
            self.left[str(ipaddress.ip_address(bytes(value)))] = ms // 1000


class ElementSocket:
    """A NETLINK_NETFILTER socket kept for one namespace's learned-set writes, one batch at a time.

    Kept, not made per write: making one inside a namespace costs about 0.3 ms, and closing one soon after
    it committed waits an RCU grace period in the kernel (15-25 ms measured). It keeps its namespace
    alive, so its owner closes it when the sandbox goes, off the event loop (that close may wait too)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock = sock
        self._where = where
        self._lock = threading.Lock()
        self._seq = 0

    @classmethod
    def open(cls, path: str | None, setns: Callable[[int, int], int] | None = None) -> ElementSocket:
        """In the namespace at path (None: the agent's own). Raises NetnsError, or OSError."""
        if path is None:
            return cls(netfilter_socket(), "egressd's own namespace")
        return cls(in_netns(path, netfilter_socket, setns)[0], path)

    def learn(self, family: str, table: str, sets: tuple[str, str], timeouts: Mapping[str, int]) -> None:
        """timeouts (address -> seconds) into the sets of `family table`, in one transaction. Raises
        ApplyError."""
        if not timeouts:
            return
        with self._lock:
            begin = self._seq = (self._seq + 1000) % 0x7FFF0000  # stale replies never match a new batch
            batch, acked = learn_batch(family, table, sets, timeouts, begin)
            reader = AckReader(begin, acked)
            try:
                self._sock.sendall(batch)
                while not reader.done:
                    data = self._sock.recv(RECV_BUFFER)
                    if not data:
                        raise OSError(errno.ECONNRESET, "netlink socket closed")
                    reader.feed(data)
            except (OSError, ValueError) as e:  # timeout included
                raise ApplyError(
                    f"the learned addresses could not be written in {self._where}: {e}"
                ) from None
        if reader.error:
            raise ApplyError(
                f"the kernel refused the learned addresses for {family} {table} in {self._where}: "
                f"{os.strerror(reader.error)}"
            )

    def read(self, family: str, table: str, sets: tuple[str, str]) -> dict[str, int]:
        """Address -> seconds left, of the sets (a set or table that is not there holds nothing): what a
        restarted proxy starts from. Raises ApplyError."""
        out: dict[str, int] = {}
        for left in self.elements(family, table, sets).values():
            out.update(left)
        return out

    def elements(self, family: str, table: str, sets: Iterable[str]) -> dict[str, dict[str, int]]:
        """Each named plain address set that exists -> its addresses, with the seconds each has left (0
        without a timeout). Raises ApplyError."""
        out: dict[str, dict[str, int]] = {}
        with self._lock:
            for name in sets:
                self._seq = (self._seq + 1000) % 0x7FFF0000
                reader = ElementReader(self._seq)
                try:
                    self._sock.sendall(getsetelem_request(family, table, name, self._seq))
                    while not reader.done:
                        data = self._sock.recv(RECV_BUFFER)
                        if not data:
                            raise OSError(errno.ECONNRESET, "netlink socket closed")
                        reader.feed(data)
                except (OSError, ValueError, NetlinkError) as e:
                    why = f"the sets of {table} could not be read in {self._where}: {e}"
                    raise ApplyError(why) from None
                if not reader.missing:
                    out[name] = reader.left
        return out

    def fileno(self) -> int:
        return self._sock.fileno()

    def close(self) -> None:
        with self._lock:
            self._sock.close()
