"""egressd's nftables JSON commands as one nf_tables netlink batch, without libnftables (issue 19).

encode_batch turns the commands egressd gives libnftables for a table (ruleset/variants.py and
ruleset/transactions.py: the replace, the stage and the switch, element updates, learned addresses, a
table's deletion) into the messages libnftables 1.0.6 sends for them (byte for byte but for sequence
numbers, NLM_F_ACK and set ids: tests/integration/test_nfnl_batch.py for the host-side tables, family
netdev, and tests/integration/test_nfnl_sandbox.py for a sandbox's own, family inet, compare them under
strace), in one batch (begin, the messages, end), the last message asking for an acknowledgement.
nfnl_batch.BatchSocket sends it.

It is a pure function of the commands: it reads nothing from the kernel. What libnftables would learn from
its cache must therefore be in the batch or be said: a set's type and flags come from its declaration in
the same batch, or from `plain_sets` for sets already in the kernel, which must be plain (not interval)
sets; interval elements are only written into a set made empty in the same batch. Any command, object key
or expression it does not know raises EncodeError before anything is sent (nfnl_exprs.py, nfnl_inet.py and
nfnl_stmts.py have the expressions).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from egressd.kernel import nfnl
from egressd.kernel import nfnl_exprs as nx
from egressd.kernel.nfnl import (
    NFNL_MSG_BATCH_BEGIN,
    NFNL_MSG_BATCH_END,
    NFPROTO_INET,
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
from egressd.kernel.nfnl_exprs import EncodeError, strz, u32, udata
from egressd.kernel.nfnl_inet import InetRuleEncoder

NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE = 0, 2, 3, 5, 6, 8
NEWSET, DELSET, NEWSETELEM, DELSETELEM, NEWOBJ, DELOBJ = 9, 11, 12, 14, 18, 20
NFT_SET_TIMEOUT = 0x10
NFT_OBJECT_COUNTER = 1
SET_TYPES = {
    "ipv4_addr": (nx.TYPE_IPADDR, 4, 4),
    "ipv6_addr": (nx.TYPE_IP6ADDR, 16, 6),
}  # datatype, length, IP
SET_FLAGS = {"interval": nx.NFT_SET_INTERVAL, "timeout": NFT_SET_TIMEOUT}
FAMILIES = {"netdev": NFPROTO_NETDEV, "inet": NFPROTO_INET}
# Base chains: the chain types and the hooks (NF_NETDEV_*, NF_INET_*) of each family
BASE_TYPES = {"netdev": ("filter",), "inet": ("filter", "nat")}
HOOKS = {
    "netdev": {"ingress": 0, "egress": 1},
    "inet": {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4},
}
POLICIES = {"drop": 0, "accept": 1}
KINDS = ("table", "chain", "set", "element", "counter", "rule")


@dataclass(frozen=True)
class Batch:
    data: bytes
    acked: list[int]  # the sequence numbers to be acknowledged: the last message's (see finish)
    origin: dict[int, int]  # sequence number -> index of the command it came from


@dataclass(frozen=True)
class _Rule:
    """A rule's messages as encoded once (its anonymous sets', then its own), and what they depend on."""

    messages: tuple[tuple[int, int, bytes], ...]  # type, flags, body
    lookups: tuple[tuple[str, int | None], ...]  # the named sets it looks up, with their ids then
    first_id: int | None  # the last set id before it, when it made anonymous sets (their ids follow it)
    ids: int  # how many set ids it took


# Rules as encoded, by family and text (repr), shared by every batch: a sandbox's table is mostly rules
# that every table of its shape has (its own addresses are in its sets), and encoding one costs 10-20 times
# more than finding it. Bounded: emptied when full.
RULES: dict[tuple[str, str], tuple[_Rule, ...]] = {}
RULES_MAX = 2048
RULE_FORMS = 4  # encodings kept per rule text: where the set ids it uses differ (tables of other shapes)
# Sets declared with their elements, the same way: the guard's sets (private ranges, guard deny, the
# embedded-IPv4 prefixes) are in every table, and their interval elements were most of what a new table's
# sets cost to encode. By family, verb, text, the set's id in the batch and whether it starts empty.
SETS: dict[tuple[str, str, str, int, bool], tuple[tuple[int, int, bytes], ...]] = {}
SETS_MAX = 256  # the guard's sets are a handful; a policy's own (its allow and deny sets) fill the rest


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
    return obj


def _plain_value(value: Any) -> tuple[str, int | None]:
    """A plain set's element: an address, or {"elem": {"val": address, "timeout": seconds}}."""
    if isinstance(value, str):
        return value, None
    inner = value.get("elem") if isinstance(value, dict) and set(value) == {"elem"} else None
    if isinstance(inner, dict) and set(inner) == {"val", "timeout"} and isinstance(inner["timeout"], int):
        return inner["val"], inner["timeout"] * 1000
    raise EncodeError(f"unsupported element {value!r} for a set without intervals")


def describe(cmd: Any) -> str:
    """`add rule netdev t c`: a command, for errors."""
    try:
        ((verb, what),) = cmd.items()
        ((kind, obj),) = what.items()
        names = [obj.get(k) for k in ("family", "table", "chain", "name") if isinstance(obj.get(k), str)]
        return " ".join([verb, kind, *names])
    except (AttributeError, TypeError, ValueError):
        return repr(cmd)[:80]


class _Encoder:
    """Builds one batch, command by command; knows the sets the batch declares, and `plain` ones. Tables
    are named by family and name ("inet egressd"); each command's family is its object's."""

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
        self.family = "netdev"  # the current command's
        self.recording: list[tuple[int, int, bytes]] | None = None  # the messages of a rule being encoded

    def message(self, kind: int, flags: int, body: bytes) -> None:
        if self.recording is not None:
            self.recording.append((kind, flags, body))
        self.seq += 1
        payload = nfnl.NFGENMSG.pack(FAMILIES[self.family], nfnl.NFNETLINK_V0, 0) + body
        head = (NLMSGHDR.size + len(payload), (nfnl.NFNL_SUBSYS_NFTABLES << 8) | kind)
        self.parts.append(NLMSGHDR.pack(*head, NLM_F_REQUEST | flags, self.seq, 0) + payload)
        self.origin[self.seq] = self.index

    def command(self, cmd: Any) -> None:
        ((verb, what),) = cmd.items() if isinstance(cmd, dict) and len(cmd) == 1 else ((None, None),)
        ((kind, obj),) = what.items() if isinstance(what, dict) and len(what) == 1 else ((None, None),)
        if verb not in ("add", "create", "delete", "flush") or kind not in KINDS:
            raise EncodeError("unsupported command")
        if (verb == "flush" and kind not in ("chain", "set")) or (kind == "rule" and verb != "add"):
            raise EncodeError("unsupported command")
        family = obj.get("family") if isinstance(obj, dict) else None
        if family not in FAMILIES:
            raise EncodeError(f"family {family!r}: only {' and '.join(FAMILIES)} tables are encoded")
        self.family = family
        getattr(self, kind)(verb, obj)

    def table_key(self, table: str) -> str:
        return f"{self.family} {table}"

    def finish(self) -> Batch:
        """The batch, its last message asking for an acknowledgement. The kernel answers a message without
        NLM_F_ACK only to refuse it, and sends every answer once the whole batch is processed (committed or
        not), in order: the last message's acknowledgement comes after every refusal. libnftables 1.0.6
        asks none and reads whatever is there; acknowledging each message cost a receive per message."""
        if len(self.parts) > 1:
            last = self.parts[-1]
            flags = struct.unpack_from("=H", last, 6)[0] | NLM_F_ACK
            self.parts[-1] = last[:6] + struct.pack("=H", flags) + last[8:]
            self.acked.append(self.seq)
        end = batch_marker(NFNL_MSG_BATCH_END, self.seq + 1)
        return Batch(b"".join([*self.parts, end]), self.acked, self.origin)

    def table(self, verb: str, obj: Any) -> None:
        name = _fields(obj, {"family", "name"})["name"]
        if verb == "delete":
            self.message(DELTABLE, 0, strz(1, name))  # NFTA_TABLE_NAME
            self.emptied.add(self.table_key(name))
            self.sets = {k: v for k, v in self.sets.items() if k[0] != self.table_key(name)}
        else:  # NFTA_TABLE_FLAGS: none
            self.message(NEWTABLE, NLM_F_EXCL if verb == "create" else 0, strz(1, name) + u32(2, 0))

    def chain(self, verb: str, obj: Any) -> None:
        base = frozenset({"type", "hook", "prio", "policy", *(["dev"] if self.family == "netdev" else [])})
        o = _fields(obj, {"family", "table", "name"}, base if verb in ("add", "create") else frozenset())
        where = strz(1, o["table"])  # NFTA_CHAIN_TABLE (NFTA_RULE_TABLE for a flush)
        if verb == "delete":
            return self.message(DELCHAIN, 0, where + strz(3, o["name"]))
        if verb == "flush":
            return self.message(DELRULE, 0, where + strz(2, o["name"]))  # NFTA_RULE_CHAIN
        body = where + strz(3, o["name"])  # NFTA_CHAIN_NAME
        if set(o) & base:
            hooks, types = HOOKS[self.family], BASE_TYPES[self.family]
            if not (base - {"policy"} <= set(o) and o["type"] in types and o["hook"] in hooks):
                raise EncodeError(f"a base chain of {self.family} with type, hook and priority, not {o!r}")
            if not isinstance(o["prio"], int) or o.get("policy", "accept") not in POLICIES:
                raise EncodeError(f"priority {o['prio']!r} or policy {o.get('policy')!r}")
            body += strz(7, o["type"])  # NFTA_CHAIN_TYPE, _POLICY, _HOOK {HOOKNUM, PRIORITY, DEV}
            body += u32(5, POLICIES[o["policy"]]) if "policy" in o else b""
            dev = strz(3, o["dev"]) if "dev" in o else b""
            body += nested(4, u32(1, hooks[o["hook"]]) + u32(2, o["prio"]) + dev)
        self.message(NEWCHAIN, NLM_F_CREATE | (NLM_F_EXCL if verb == "create" else 0), body)

    def set(self, verb: str, obj: Any) -> None:
        if verb in ("delete", "flush"):
            o = _fields(obj, {"family", "table", "name"})
            where = strz(1, o["table"]) + strz(2, o["name"])  # NFTA_SET_TABLE, _NAME (= _ELEM_LIST_*)
            if verb == "delete":
                self.sets.pop((self.table_key(o["table"]), o["name"]), None)
                return self.message(DELSET, 0, where)
            known = self.sets.get((self.table_key(o["table"]), o["name"]))
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
        fresh = verb == "create" or self.table_key(o["table"]) in self.emptied
        s = _Set(self.last_set_id, version, bool(flags & nx.NFT_SET_INTERVAL), fresh, verb == "create")
        self.sets[self.table_key(o["table"]), o["name"]] = s
        key = (self.family, verb, repr(o), s.set_id, fresh) if o.get("elem") else None
        done = SETS.get(key) if key is not None else None
        if done is not None:
            for message in done:
                self.message(*message)
            s.fresh = s.fresh and not s.interval  # as add_elements leaves it
            return
        self.recording = [] if key is not None else None
        try:
            body = strz(1, o["table"]) + strz(2, o["name"]) + u32(3, flags) + u32(4, dtype) + u32(5, size)
            body += u32(10, s.set_id) + attr(13, nx.set_udata(nx.BIG))  # NFTA_SET_ID, NFTA_SET_USERDATA
            self.message(NEWSET, NLM_F_CREATE | (NLM_F_EXCL if verb == "create" else 0), body)
            if o.get("elem"):
                self.add_elements(o["table"], o["name"], s, o["elem"], 0)
            if key is not None:
                if len(SETS) >= SETS_MAX:
                    SETS.clear()
                SETS[key] = tuple(self.recording or ())
        finally:
            self.recording = None

    def element(self, verb: str, obj: Any) -> None:
        o = _fields(obj, {"family", "table", "name", "elem"})
        s = self.sets.get((self.table_key(o["table"]), o["name"]))
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
        self.elements(DELSETELEM, 0, strz(1, o["table"]) + strz(2, o["name"]), items)

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
        head = strz(1, table) + strz(2, name) + (u32(4, s.set_id) if s.set_id is not None else b"")
        self.elements(NEWSETELEM, NLM_F_CREATE | flags, head, items)

    def elements(self, kind: int, flags: int, head: bytes, items: list[bytes]) -> None:
        """NFTA_SET_ELEM_LIST_ELEMENTS (3) after head, in as many messages as it takes: an attribute's length
        is 16 bits, and libnftables starts the next message with the element that would not fit."""
        start, size = 0, 4
        for i, item in enumerate(items):
            if size + len(item) > 0xFFFF:
                self.message(kind, flags, head + nested(3, b"".join(items[start:i])))
                start, size = i, 4
            size += len(item)
        self.message(kind, flags, head + nested(3, b"".join(items[start:])))

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
        """From RULES when the same rule was encoded with the same set ids; the fingerprint's (a comment)
        is never the same twice, and is not kept."""
        o = _fields(obj, {"family", "table", "chain", "expr"}, frozenset({"comment"}))
        key, table = (self.family, repr(o)), self.table_key(o["table"])
        forms = RULES.get(key, ())
        for done in forms:
            fits = done.first_id in (None, self.last_set_id)
            if fits and all(self.set_id(table, n) == i for n, i in done.lookups):
                for message in done.messages:
                    self.message(*message)
                self.last_set_id += done.ids
                return
        first, lookups = self.last_set_id, []

        def set_id(name: str) -> int | None:
            lookups.append((name, self.set_id(table, name)))
            return lookups[-1][1]

        self.recording = []
        try:
            anonymous = self.encode_rule(o, set_id)
            messages = tuple(self.recording)
        finally:
            self.recording = None
        if "comment" not in o:
            if len(RULES) >= RULES_MAX:
                RULES.clear()
            ids = self.last_set_id - first
            form = _Rule(messages, tuple(lookups), first if anonymous else None, ids)
            RULES[key] = (form, *forms[: RULE_FORMS - 1])

    def set_id(self, table: str, name: str) -> int | None:
        return getattr(self.sets.get((table, name)), "set_id", None)

    def encode_rule(self, o: dict[str, Any], set_id: Callable[[str], int | None]) -> bool:
        """The rule's messages; whether it made anonymous sets."""
        table = o["table"]
        encoder = InetRuleEncoder if self.family == "inet" else nx.RuleEncoder
        rule = encoder(set_id, self._set_id)
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
        return bool(rule.anon)

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
            raise EncodeError(f"command {i} ({describe(cmd)}): {e}") from None
    return encoder.finish()
