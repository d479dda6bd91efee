"""egressd's nftables JSON commands as one nf_tables netlink batch, written without libnftables (issue 19).

libnftables 1.0.6 loads every table of a namespace (and every element of every interval set) before each
write, so in the agent's namespace, which holds one host-side table per sandbox interface, a change costs
0.3-1.6 s at 1,000 tables. The kernel's part is well under a millisecond. encode_batch turns the commands
egressd gives libnftables for a host-side table (ruleset/variants.py and ruleset/transactions.py: the
replace, the stage and the switch, element updates, learned addresses, a table's deletion) into the
messages libnftables 1.0.6 sends for them (byte for byte but for sequence numbers, NLM_F_ACK and set ids:
tests/integration/test_nfnl_batch.py compares them under strace), in one batch (begin, the messages, end),
every message asking for an acknowledgement. BatchSocket sends it in a namespace and reads the answers
(nfnl_elements.AckReader). The batch applies whole or not at all, as a libnftables transaction does.

It is a pure function of the commands: it reads nothing from the kernel. What libnftables would learn from
its cache must therefore be in the batch or be said: a set's type and flags come from its declaration in
the same batch, or from `plain_sets` for sets already in the kernel, which must be plain (not interval)
sets; interval elements are only written into a set made empty in the same batch. Any command, object key
or expression it does not know raises EncodeError before anything is sent (nfnl_exprs.py has the
expressions). Family netdev only: the host-side tables'.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from egressd.kernel import nfnl
from egressd.kernel import nfnl_exprs as nx
from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import in_netns
from egressd.kernel.nfnl import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFPROTO_NETDEV,
    NLM_F_ACK,
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REQUEST,
    NLMSGHDR,
    attr,
    batch_marker,
    nested,
)
from egressd.kernel.nfnl_elements import AckReader
from egressd.kernel.nfnl_exprs import EncodeError, strz, u32, udata

__all__ = ["Batch", "BatchSocket", "EncodeError", "encode_batch"]

NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM, NEWOBJ, DELOBJ = 9, 11, 12, 14, 18, 20
NFT_SET_TIMEOUT = 0x10
NFT_OBJECT_COUNTER = 1
SET_TYPES = {
    "ipv4_addr": (nx.TYPE_IPADDR, 4, 4),
    "ipv6_addr": (nx.TYPE_IP6ADDR, 16, 6),
}  # datatype, length, IP
SET_FLAGS = {"interval": nx.NFT_SET_INTERVAL, "timeout": NFT_SET_TIMEOUT}
HOOKS = {"ingress": 0, "egress": 1}  # NF_NETDEV_*
POLICIES = {"drop": 0, "accept": 1}
SOL_NETLINK, NETLINK_CAP_ACK, SO_SNDBUFFORCE, SO_RCVBUFFORCE = 270, 10, 32, 33
KINDS = ("table", "chain", "set", "element", "counter", "rule")
ACK_TRUESIZE = 2048  # what one acknowledgement may cost in the receive buffer (an skb), generously


@dataclass(frozen=True)
class Batch:
    data: bytes
    acked: list[int]  # the sequence numbers to be acknowledged, one per message
    origin: dict[int, int]  # sequence number -> index of the command it came from


@dataclass
class _Set:
    set_id: int | None  # declared in this batch: its id there
    version: int  # 4 or 6
    interval: bool
    fresh: bool = False  # empty when its elements come: interval elements can be computed
    created: bool = False  # declared with `create`: libnftables then sends no leading zero element


def _fields(obj: Any, required: set[str], optional: frozenset[str] = frozenset()) -> dict[str, Any]:
    if not isinstance(obj, dict) or not required <= set(obj) <= required | optional:
        raise EncodeError(f"expected the keys {sorted(required)} (and maybe {sorted(optional)}), not {obj!r}")
    if obj.get("family", "netdev") != "netdev":
        raise EncodeError(f"family {obj['family']!r}: only netdev tables are written over netlink")
    return obj


def _plain_value(value: Any) -> tuple[str, int | None]:
    """A plain set's element: an address, or {"elem": {"val": address, "timeout": seconds}}."""
    if isinstance(value, str):
        return value, None
    inner = value.get("elem") if isinstance(value, dict) and set(value) == {"elem"} else None
    if isinstance(inner, dict) and set(inner) == {"val", "timeout"} and isinstance(inner["timeout"], int):
        return inner["val"], inner["timeout"] * 1000
    raise EncodeError(f"unsupported element {value!r} for a set without intervals")


def _describe(cmd: Any) -> str:
    """`add rule netdev t c`: a command, for errors."""
    try:
        ((verb, what),) = cmd.items()
        ((kind, obj),) = what.items()
        names = [obj.get(k) for k in ("family", "table", "chain", "name") if isinstance(obj.get(k), str)]
        return " ".join([verb, kind, *names])
    except (AttributeError, TypeError, ValueError):
        return repr(cmd)[:80]


class _Encoder:
    """Builds one batch, command by command; knows the sets the batch declares, and `plain` ones."""

    def __init__(self, seq: int, plain: Mapping[str, str]) -> None:
        self.seq = seq
        self.parts = [batch_marker(NFNL_MSG_BATCH_BEGIN, seq)]
        self.acked: list[int] = []
        self.origin: dict[int, int] = {}
        self.index = 0
        self.plain = plain
        self.sets: dict[tuple[str, str], _Set] = {}
        self.emptied: set[str] = set()  # tables deleted earlier in this batch: what is made there is empty
        self.last_set_id = 0

    def message(self, kind: int, flags: int, body: bytes) -> None:
        self.seq += 1
        payload = nfnl.NFGENMSG.pack(NFPROTO_NETDEV, nfnl.NFNETLINK_V0, 0) + body
        head = (NLMSGHDR.size + len(payload), (nfnl.NFNL_SUBSYS_NFTABLES << 8) | kind)
        self.parts.append(NLMSGHDR.pack(*head, NLM_F_REQUEST | NLM_F_ACK | flags, self.seq, 0) + payload)
        self.acked.append(self.seq)
        self.origin[self.seq] = self.index

    def command(self, cmd: Any) -> None:
        ((verb, what),) = cmd.items() if isinstance(cmd, dict) and len(cmd) == 1 else ((None, None),)
        ((kind, obj),) = what.items() if isinstance(what, dict) and len(what) == 1 else ((None, None),)
        if verb not in ("add", "create", "delete", "flush") or kind not in KINDS:
            raise EncodeError("unsupported command")
        if (verb == "flush" and kind not in ("chain", "set")) or (kind == "rule" and verb != "add"):
            raise EncodeError("unsupported command")
        getattr(self, kind)(verb, obj)

    def finish(self) -> Batch:
        return Batch(
            b"".join([*self.parts, batch_marker(NFNL_MSG_BATCH_END, self.seq + 1)]), self.acked, self.origin
        )

    def table(self, verb: str, obj: Any) -> None:
        name = _fields(obj, {"family", "name"})["name"]
        if verb == "delete":
            self.message(DELTABLE, 0, strz(1, name))  # NFTA_TABLE_NAME
            self.emptied.add(name)
            self.sets = {k: v for k, v in self.sets.items() if k[0] != name}
        else:  # NFTA_TABLE_FLAGS: none
            self.message(NEWTABLE, NLM_F_EXCL if verb == "create" else 0, strz(1, name) + u32(2, 0))

    def chain(self, verb: str, obj: Any) -> None:
        base = (
            frozenset({"type", "hook", "prio", "policy", "dev"}) if verb in ("add", "create") else frozenset()
        )
        o = _fields(obj, {"family", "table", "name"}, base)
        where = strz(1, o["table"])  # NFTA_CHAIN_TABLE (NFTA_RULE_TABLE for a flush)
        if verb == "delete":
            return self.message(DELCHAIN, 0, where + strz(3, o["name"]))
        if verb == "flush":
            return self.message(DELRULE, 0, where + strz(2, o["name"]))  # NFTA_RULE_CHAIN
        body = where + strz(3, o["name"])  # NFTA_CHAIN_NAME
        if set(o) & base:
            if not (
                {"type", "hook", "prio", "dev"} <= set(o) and o["type"] == "filter" and o["hook"] in HOOKS
            ):
                raise EncodeError(f"a base chain here is a netdev filter chain on a device, not {o!r}")
            if not isinstance(o["prio"], int) or o.get("policy", "accept") not in POLICIES:
                raise EncodeError(f"priority {o['prio']!r} or policy {o.get('policy')!r}")
            body += strz(7, o["type"])  # NFTA_CHAIN_TYPE, _POLICY, _HOOK {HOOKNUM, PRIORITY, DEV}
            body += u32(5, POLICIES[o["policy"]]) if "policy" in o else b""
            body += nested(4, u32(1, HOOKS[o["hook"]]) + u32(2, o["prio"]) + strz(3, o["dev"]))
        self.message(NEWCHAIN, NLM_F_CREATE | (NLM_F_EXCL if verb == "create" else 0), body)

    def set(self, verb: str, obj: Any) -> None:
        if verb in ("delete", "flush"):
            o = _fields(obj, {"family", "table", "name"})
            where = strz(1, o["table"]) + strz(2, o["name"])  # NFTA_SET_TABLE, _NAME (= _ELEM_LIST_*)
            if verb == "delete":
                self.sets.pop((o["table"], o["name"]), None)
                return self.message(DELSET, 0, where)
            known = self.sets.get((o["table"], o["name"]))
            if known is not None:
                known.fresh = True
            return self.message(DELSETELEM, 0, strz(2, o["name"]) + strz(1, o["table"]))  # libnftables' order
        o = _fields(obj, {"family", "table", "name", "type"}, frozenset({"flags", "elem"}))
        if o["type"] not in SET_TYPES or not set(o.get("flags", [])) <= set(SET_FLAGS):
            raise EncodeError(f"set type {o['type']!r} with flags {o.get('flags')!r}")
        if verb == "create" and o.get("elem"):
            raise EncodeError("`create set` with elements: create it, then add them")
        dtype, size, version = SET_TYPES[o["type"]]
        flags = sum(SET_FLAGS[f] for f in set(o.get("flags", [])))
        self.last_set_id += 1
        fresh = verb == "create" or o["table"] in self.emptied
        s = _Set(self.last_set_id, version, bool(flags & nx.NFT_SET_INTERVAL), fresh, verb == "create")
        self.sets[o["table"], o["name"]] = s
        body = strz(1, o["table"]) + strz(2, o["name"]) + u32(3, flags) + u32(4, dtype) + u32(5, size)
        body += u32(10, s.set_id) + attr(13, nx.set_udata(nx.BIG))  # NFTA_SET_ID, NFTA_SET_USERDATA
        self.message(NEWSET, NLM_F_CREATE | (NLM_F_EXCL if verb == "create" else 0), body)
        if o.get("elem"):
            self.add_elements(o["table"], o["name"], s, o["elem"], 0)

    def element(self, verb: str, obj: Any) -> None:
        o = _fields(obj, {"family", "table", "name", "elem"})
        s = self.sets.get((o["table"], o["name"]))
        if s is None and o["name"] in self.plain and self.plain[o["name"]] in SET_TYPES:
            s = _Set(None, SET_TYPES[self.plain[o["name"]]][2], interval=False)
        if s is None:
            raise EncodeError(f"set {o['name']!r} is neither declared in this batch nor a known plain set")
        if verb != "delete":
            return self.add_elements(
                o["table"], o["name"], s, o["elem"], NLM_F_EXCL if verb == "create" else 0
            )
        if s.interval or not isinstance(o["elem"], list) or not all(isinstance(v, str) for v in o["elem"]):
            raise EncodeError("only addresses are deleted, and only from sets without intervals")
        items = [nx.element(nx.address(s.version)(v)) for v in o["elem"]]
        where = strz(1, o["table"]) + strz(2, o["name"])
        self.message(DELSETELEM, 0, where + nested(3, b"".join(items)))  # NFTA_SET_ELEM_LIST_ELEMENTS

    def add_elements(self, table: str, name: str, s: _Set, elems: Any, flags: int) -> None:
        if not isinstance(elems, list) or not elems:
            raise EncodeError(f"elements must be a non-empty list, not {elems!r}")
        if s.interval:
            if not s.fresh:
                raise EncodeError(f"interval elements for set {name!r}, which may already hold elements")
            ranges = [nx.address_range(v, s.version) for v in elems]
            items, _ = nx.interval_elements(ranges, 4 if s.version == 4 else 16, False, not s.created)
            s.fresh = False
        else:
            items = [nx.element(nx.address(s.version)(v), timeout_ms=t) for v, t in map(_plain_value, elems)]
        body = strz(1, table) + strz(2, name) + (u32(4, s.set_id) if s.set_id is not None else b"")
        self.message(NEWSETELEM, NLM_F_CREATE | flags, body + nested(3, b"".join(items)))

    def counter(self, verb: str, obj: Any) -> None:
        extra = frozenset({"packets", "bytes"}) if verb != "delete" else frozenset()
        o = _fields(obj, {"family", "table", "name"}, extra)
        where = strz(1, o["table"]) + strz(2, o["name"]) + u32(3, NFT_OBJECT_COUNTER)  # NFTA_OBJ_*
        if verb == "delete":
            return self.message(DELOBJ, 0, where + nested(4, b""))
        values = struct.pack("!Q", o.get("bytes", 0)), struct.pack("!Q", o.get("packets", 0))
        data = nested(4, attr(1, values[0]) + attr(2, values[1]))  # NFTA_COUNTER_BYTES, _PACKETS
        self.message(NEWOBJ, NLM_F_CREATE | (NLM_F_EXCL if verb == "create" else 0), where + data)

    def rule(self, verb: str, obj: Any) -> None:
        o = _fields(obj, {"family", "table", "chain", "expr"}, frozenset({"comment"}))
        table = o["table"]
        rule = nx.RuleEncoder(
            lambda name: getattr(self.sets.get((table, name)), "set_id", None), self._set_id
        )
        if not isinstance(o["expr"], list):
            raise EncodeError("a rule's expr is a list")
        for stmt in o["expr"]:
            rule.statement(stmt)
        for anon in rule.anon:
            self.anonymous(table, anon)
        body = strz(1, table) + strz(2, o["chain"]) + nested(4, b"".join(rule.exprs))
        if "comment" in o:  # NFTA_RULE_USERDATA: the comment record, with its NUL
            comment = o["comment"].encode() + b"\0"
            if len(comment) > 255:
                raise EncodeError("a rule comment longer than 254 bytes")
            body += attr(7, udata(0, comment))
        self.message(NEWRULE, NLM_F_CREATE | NLM_F_APPEND, body)

    def _set_id(self) -> int:
        self.last_set_id += 1
        return self.last_set_id

    def anonymous(self, table: str, anon: nx.AnonSet) -> None:
        f, interval = anon.key, bool(anon.flags & nx.NFT_SET_INTERVAL)
        if interval:
            ranges = [nx.address_range(v, f.version) for v in anon.values]
            items, size = nx.interval_elements(ranges, f.size, True, True)
        else:
            keys = [f.encode(v) for v in anon.values]
            if len(set(keys)) != len(keys):
                raise EncodeError(f"a value twice in one anonymous set: {anon.values!r}")
            items, size = [nx.element(k) for k in keys], len(keys)
        where = strz(1, table) + strz(2, "__set%d")
        body = where + u32(3, anon.flags) + u32(4, f.dtype) + u32(5, f.size) + u32(10, anon.set_id)
        body += nested(9, u32(1, size)) + attr(13, nx.set_udata(f.order, interval, f.typeof))  # DESC_SIZE
        self.message(NEWSET, NLM_F_CREATE, body)
        self.message(NEWSETELEM, NLM_F_CREATE, where + u32(4, anon.set_id) + nested(3, b"".join(items)))


def encode_batch(commands: list[Any], seq: int = 0, plain_sets: Mapping[str, str] | None = None) -> Batch:
    """The commands as one batch: begin (seq), one message per object (seq + 1, ...), end. plain_sets:
    name -> type (ipv4_addr, ipv6_addr) of sets without intervals already in the kernel that element
    commands may write. Raises EncodeError, naming the command."""
    encoder = _Encoder(seq, plain_sets or {})
    for i, cmd in enumerate(commands):
        encoder.index = i
        try:
            encoder.command(cmd)
        except (ValueError, TypeError, KeyError, AttributeError, struct.error) as e:  # EncodeError included
            raise EncodeError(f"command {i} ({_describe(cmd)}): {e}") from None
    return encoder.finish()


def _refusals(data: bytes) -> list[tuple[int, int]]:
    """(sequence number, errno) of every refusal in one datagram of answers (AckReader keeps only the
    first errno; this says which message it was, for the error)."""
    out, view, off = [], memoryview(data), 0
    while off + NLMSGHDR.size <= len(view):
        length, kind, _, seq, _ = NLMSGHDR.unpack_from(view, off)
        if kind == nfnl.NLMSG_ERROR and length >= NLMSGHDR.size + 4:
            code = -struct.unpack_from("=i", view, off + NLMSGHDR.size)[0]
            if code:
                out.append((seq, code))
        off += max(nfnl.align(length), NLMSGHDR.size)
    return out


class BatchSocket:
    """A NETLINK_NETFILTER socket kept for one namespace's batches, one batch at a time.

    Kept, like nfnl_elements.ElementSocket and for the same reasons (making one inside a namespace costs
    about 0.3 ms; closing one soon after a commit waits an RCU grace period)."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self._sock = sock
        self._where = where
        self._lock = threading.Lock()
        self._seq = 0
        self._buffers = [0, 0]  # the send and receive buffer sizes asked for so far
        # An error's acknowledgement without the refused message in it: a refused batch of many elements
        # would otherwise fill the receive buffer with copies of itself.
        with contextlib.suppress(OSError):
            sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)

    @classmethod
    def open(cls, path: str | None = None, setns: Callable[[int, int], int] | None = None) -> BatchSocket:
        """In the namespace at path (None: the agent's own). Raises NetnsError, or OSError."""
        if path is None:
            return cls(nfnl.netfilter_socket(), "egressd's own namespace")
        return cls(in_netns(path, nfnl.netfilter_socket, setns)[0], path)

    def _grow(self, which: int, size: int) -> None:
        """Buffers big enough for the batch and for every acknowledgement (a lost one would be a write
        whose outcome is unknown)."""
        if size > self._buffers[which]:
            force, plain = ((SO_SNDBUFFORCE, socket.SO_SNDBUF), (SO_RCVBUFFORCE, socket.SO_RCVBUF))[which]
            try:
                self._sock.setsockopt(socket.SOL_SOCKET, force, size)
            except OSError:
                self._sock.setsockopt(socket.SOL_SOCKET, plain, size)
            self._buffers[which] = size

    def run(
        self, commands: list[Any], what: str = "transaction", plain_sets: Mapping[str, str] | None = None
    ) -> None:
        """The commands, in one transaction. Raises EncodeError (nothing was sent) or ApplyError."""
        with self._lock:
            begin = self._seq = 1 if self._seq > 0x7F000000 else self._seq + 1
            batch = encode_batch(commands, begin, plain_sets)
            self._seq = batch.acked[-1] + 1 if batch.acked else begin
            if not batch.acked:
                return
            reader, refused = AckReader(begin, batch.acked), []
            try:
                self._grow(0, len(batch.data) + nfnl.RECV_BUFFER)
                self._grow(1, len(batch.acked) * ACK_TRUESIZE + nfnl.RECV_BUFFER)
                self._sock.sendall(batch.data)
                while not reader.done:
                    data = self._sock.recv(nfnl.RECV_BUFFER)
                    if not data:
                        raise OSError(errno.ECONNRESET, "netlink socket closed")
                    reader.feed(data)
                    refused += [r for r in _refusals(data) if r[0] in batch.origin or r[0] == begin]
            except (OSError, ValueError) as e:  # timeout included
                raise ApplyError(f"the {what} could not be written in {self._where}: {e}") from None
        if reader.error:
            seq, code = min(refused, default=(begin, reader.error))
            i = batch.origin.get(seq)
            at = "" if i is None else f" (command {i}: {_describe(commands[i])})"
            raise ApplyError(f"the kernel refused the {what} in {self._where}: {os.strerror(code)}{at}")

    def close(self) -> None:
        with self._lock:
            self._sock.close()
