"""Host-side tables read over raw netlink (issue 19): libnftables 1.0.6 loads every table of the namespace
to list one (10 ms at 1,000 host-side tables, under its lock; `list tables`: 77 s).

What the kernel filters by table (6.1 and 6.18 alike; tests/integration/test_nfnl_listing.py checks): rule,
set and object dumps (NFTA_*_TABLE); element dumps are per set; table and chain dumps are not. So the table
is asked for by name (a plain GET), and its chains one by one: those its rules are in or jump to, and those
the caller names. A chain no rule is in and nothing jumps to shows in the table's use count (NFTA_TABLE_USE:
chains, named sets, objects, flowtables; not a bound anonymous set); only then are all chains of the family
dumped, O(tables). The ruleset's generation is read before and after: a read during a change is done
again (as libnftables does), so a listing is one state of the table.

The listing has libnftables JSON's outline ({"table"}, {"set"}, {"counter"}, {"chain"}, {"rule"}, in a fixed
order) and its forms for what reconcile/sync.py and ruleset/transactions.py read: rule comments, jumps and
verdicts ({"jump": {"target": "decide_a"}}, {"accept": null}), limit and log (nfnl_stmts.py), set names,
set elements (addresses, {"prefix"}, {"range"}), "handle", "packets", "bytes". Other expressions are
{name: {attribute: value}}, with an anonymous set inline where a rule looks it up (its kernel name differs
from table to table); anything not decoded is kept in hex, so a change to it still changes the listing.
"""

from __future__ import annotations

import functools
import json
import socket
import struct
import threading
from collections.abc import Callable, Iterable
from typing import Any

from egressd.kernel import nfnl, nfnl_stmts
from egressd.kernel import nfnl_exprs as nx
from egressd.kernel.nfnl import DumpReader, NetlinkError, attr, attributes, each_attribute
from egressd.kernel.nfnl_elements import FAMILIES, NFTA_SET_ELEM_LIST_ELEMENTS, getsetelem_request
from egressd.ruleset.exprs import Json
from egressd.ruleset.variants import neutral_name

# Requests; each is answered with the NEW message one below it (NEWTABLE 0, NEWCHAIN 3, ...).
GETTABLE, GETCHAIN, GETRULE, GETSET, GETSETELEM, GETGEN, GETOBJ = 1, 4, 7, 10, 13, 16, 19
NAMED, NFTA_CHAIN_NAME, NFTA_TABLE_USE, NFTA_GEN_ID = 1, 3, 3, 1  # NAMED: NFTA_TABLE_NAME, NFTA_*_TABLE
ATTEMPTS = 8  # reads of a table whose ruleset changed meanwhile, before giving up
ELEM_KEY, ELEM_DATA, ELEM_FLAGS, ELEM_TIMEOUT, ELEM_EXPIRATION, ELEM_KEY_END = 1, 2, 3, 4, 5, 10
HOOKS = {"netdev": ("ingress", "egress"),
         "inet": ("prerouting", "input", "forward", "output", "postrouting", "ingress")}  # fmt: skip
SET_FLAGS = ("anonymous", "constant", "interval", "map", "timeout", "eval", "object", "concat", "expr")
VERDICT_NAMES = {code: name for name, code in nx.VERDICTS.items()}
TYPE_NAMES = {nx.TYPE_IPADDR: "ipv4_addr", nx.TYPE_IP6ADDR: "ipv6_addr"}


def _number(fmt: str) -> Callable[[memoryview], int]:
    return lambda v: int(struct.unpack(fmt, v)[0])


_u32, _s32, _u64 = _number("!I"), _number("!i"), _number("!Q")


def _str(v: memoryview) -> str:
    return bytes(v).split(b"\0", 1)[0].decode("utf-8", "replace")


def _hex(v: memoryview) -> str:
    return bytes(v).hex()


Spec = dict[int, tuple[str, Callable[[memoryview], Any]] | None]  # None: an attribute left out


def _decode(body: memoryview, spec: Spec, others: bool = True) -> Json:
    """The attributes of a body by the names in spec, in order; one not in spec as `attrN`, its bytes in
    hex, if `others` (an empty one is padding, NFTA_*_PAD: skipped). The objects' own attributes are read
    by name only: kernels add some that change by themselves (6.18: a set's element count)."""
    out: Json = {}
    for kind, value in each_attribute(body):
        if kind in spec:
            entry = spec[kind]
            if entry is not None:
                out[entry[0]] = entry[1](value)
        elif others and len(value):
            out[f"attr{kind}"] = _hex(value)
    return out


def _data(v: memoryview) -> Any:
    """NFTA_DATA_*: a value in hex, or a verdict as libnftables lists it."""
    inner = attributes(v, (nx.NFTA_DATA_VALUE, nx.NFTA_DATA_VERDICT))
    if nx.NFTA_DATA_VERDICT not in inner:
        return _hex(inner[nx.NFTA_DATA_VALUE]) if nx.NFTA_DATA_VALUE in inner else {"raw": _hex(v)}
    verdict = attributes(inner[nx.NFTA_DATA_VERDICT], (nx.NFTA_VERDICT_CODE, nx.NFTA_VERDICT_CHAIN))
    code = _s32(verdict[nx.NFTA_VERDICT_CODE]) if nx.NFTA_VERDICT_CODE in verdict else None
    name = VERDICT_NAMES.get(code) if code is not None else None
    if name in ("jump", "goto"):
        return {name: {"target": _str(verdict.get(nx.NFTA_VERDICT_CHAIN, memoryview(b"")))}}
    return {name: None} if name else {"verdict": code}


def _comment(v: memoryview) -> str | None:
    try:
        return nfnl.rule_comment(v)
    except ValueError:  # userdata of someone else's making: not a comment
        return None


DREG, SREG = ("dreg", _u32), ("sreg", _u32)
COUNTER: Spec = {1: ("bytes", _u64), 2: ("packets", _u64)}
EXPRS: dict[str, Spec] = {  # linux/netfilter/nf_tables.h, NFTA_<EXPRESSION>_*
    "meta": {1: DREG, 2: ("key", _u32), 3: SREG},
    "cmp": {1: SREG, 2: ("op", _u32), 3: ("data", _data)},
    "payload": {1: DREG, 2: ("base", _u32), 3: ("offset", _u32), 4: ("len", _u32), 5: SREG},
    "lookup": {1: ("set", _str), 2: SREG, 3: DREG, 4: None, 5: ("flags", _u32)},  # 4: a batch's set id
    "bitwise": {1: SREG, 2: DREG, 3: ("len", _u32), 4: ("mask", _data), 5: ("xor", _data), 6: ("op", _u32)},
    "immediate": {1: DREG, 2: ("data", _data)},
    "counter": COUNTER,
    "objref": {1: ("type", _u32), 2: ("name", _str), 3: ("set_sreg", _u32), 4: ("set", _str), 5: None},
}


def expression(v: memoryview) -> Json:
    """One expression: {name: {attribute: value}}; a verdict (an immediate into the verdict register), a
    limit and a log as libnftables lists them."""
    a = attributes(v, (nx.NFTA_EXPR_NAME, nx.NFTA_EXPR_DATA))
    name, data = _str(a[nx.NFTA_EXPR_NAME]), a.get(nx.NFTA_EXPR_DATA, memoryview(b""))
    args = _decode(data, EXPRS.get(name, {}))
    if name == "immediate" and args.get("dreg") == 0 and isinstance(args.get("data"), dict):
        return dict(args["data"])
    return nfnl_stmts.listed(name, data) or {name: args}


def expressions(v: memoryview) -> list[Json]:
    """A rule's expressions. Most rules of a table are those of every other (a resync reads them all):
    decoded once, kept as JSON text (1,024), so what a read returns is still its own."""
    return list(json.loads(_expressions(bytes(v))))


@functools.lru_cache(maxsize=1024)
def _expressions(data: bytes) -> str:
    return json.dumps([expression(e) for _, e in each_attribute(memoryview(data))])


TABLE: Spec = {1: ("name", _str), 2: ("flags", _u32), 4: ("handle", _u64), 6: ("userdata", _hex)}
DEVICES = ("devs", lambda v: [_str(d) for _, d in each_attribute(v)])  # NFTA_HOOK_DEVS: NFTA_DEVICE_NAMEs
HOOK: Spec = {1: ("hooknum", _u32), 2: ("prio", _s32), 3: ("dev", _str), 4: DEVICES}
CHAIN: Spec = {
    1: ("table", _str), 2: ("handle", _u64), 3: ("name", _str), 4: ("hook", lambda v: _decode(v, HOOK)),
    5: ("policy", lambda v: {0: "drop", 1: "accept"}.get(_u32(v), _u32(v))), 7: ("type", _str),
    8: ("counter", lambda v: _decode(v, COUNTER)), 10: ("flags", _u32), 12: ("userdata", _hex),
}  # fmt: skip
SET: Spec = {
    1: ("table", _str), 2: ("name", _str), 3: ("flags", _u32), 4: ("type", _u32), 5: ("key_len", _u32),
    6: ("data_type", _u32), 7: ("data_len", _u32), 8: ("policy", _u32), 9: ("desc", _hex),
    11: ("timeout", _u64), 12: ("gc-interval", _u32), 13: ("userdata", _hex), 15: ("obj_type", _u32),
    16: ("handle", _u64), 17: ("stmt", expression), 18: ("stmts", expressions),
}  # fmt: skip
OBJ: Spec = {1: ("table", _str), 2: ("name", _str), 3: ("type", _u32), 4: ("data", _hex), 6: ("handle", _u64)}
RULE: Spec = {
    1: ("table", _str), 2: ("chain", _str), 3: ("handle", _u64), 4: ("expr", expressions),
    7: ("comment", _comment),
}  # fmt: skip

Row = tuple[bytes | None, bool, bytes | None, Json]  # key (None: catch-all), interval end, key end, extra
ELEM_ATTRS = (ELEM_KEY, ELEM_DATA, ELEM_FLAGS, ELEM_TIMEOUT, ELEM_EXPIRATION, ELEM_KEY_END)


def _value(v: memoryview) -> bytes:
    return bytes(attributes(v, (nx.NFTA_DATA_VALUE,))[nx.NFTA_DATA_VALUE])


def element_rows(bodies: Iterable[memoryview]) -> list[Row]:
    """Every element of a GETSETELEM reply, with what the listing shows of it."""
    rows: list[Row] = []
    for body in bodies:
        listed = attributes(body, (NFTA_SET_ELEM_LIST_ELEMENTS,)).get(NFTA_SET_ELEM_LIST_ELEMENTS)
        for _, elem in each_attribute(listed if listed is not None else memoryview(b"")):
            a = attributes(elem, ELEM_ATTRS)
            extra: Json = {n: _u64(a[k]) // 1000 for k, n in ((4, "timeout"), (5, "expires")) if k in a}
            if ELEM_DATA in a:
                extra["data"] = _data(a[ELEM_DATA])
            end = bool(_u32(a[ELEM_FLAGS]) & nx.NFT_SET_ELEM_INTERVAL_END) if ELEM_FLAGS in a else False
            key = _value(a[ELEM_KEY]) if ELEM_KEY in a else None
            rows.append((key, end, _value(a[ELEM_KEY_END]) if ELEM_KEY_END in a else None, extra))
    return rows


def _text(kind: Any, size: int) -> Callable[[bytes], str]:
    """How a key is written: an address as libnftables writes it, anything else in hex."""
    if (kind, size) in ((nx.TYPE_IPADDR, 4), (nx.TYPE_IP6ADDR, 16)):
        family = socket.AF_INET if size == 4 else socket.AF_INET6
        return lambda key: socket.inet_ntop(family, key)
    return bytes.hex


def _span(low: int, high: int, size: int, text: Callable[[bytes], str]) -> Any:
    """A range as libnftables lists it: one address, a prefix, or {"range": [first, last]}."""
    count = high - low + 1
    first = text(low.to_bytes(size, "big"))
    if count & (count - 1) == 0 and low & (count - 1) == 0:
        bits = 8 * size - (count.bit_length() - 1)
        return first if bits == 8 * size else {"prefix": {"addr": first, "len": bits}}
    return {"range": [first, text(high.to_bytes(size, "big"))]}


def _intervals(rows: list[Row], size: int, text: Callable[[bytes], str]) -> list[Any]:
    """An interval set's start and end elements as ranges. An end is one past its range's last value; a
    start with no end after it runs to the top; an end with no start (the zero element libnftables sends
    first) ends nothing."""
    out: list[Any] = []
    start: int | None = None
    for key, end, _, _ in sorted((r for r in rows if r[0] is not None), key=lambda r: (r[0], not r[1])):
        value = int.from_bytes(key or b"", "big")
        if not end:
            start = value if start is None else start  # a second start inside a range extends it
        elif start is not None:
            out.append(_span(start, value - 1, size, text))
            start = None
    if start is not None:
        out.append(_span(start, (1 << (8 * size)) - 1, size, text))
    return out + ["*" for r in rows if r[0] is None]


def set_item(decoded: Json, rows: list[Row]) -> Json:
    """A set as listed: its type and flags by name, its elements in libnftables' forms (sorted; with a
    timeout, {"elem": {"val", "timeout", "expires"}})."""
    flags, kind, size = decoded.get("flags", 0), decoded.get("type"), decoded.get("key_len", 0)
    text = _text(kind, size)
    if flags & nx.NFT_SET_INTERVAL and not any(r[2] is not None for r in rows):
        elems = _intervals(rows, size, text)
    else:
        elems = []
        for key, _, key_end, extra in sorted(rows, key=lambda r: r[0] or b""):
            val: Any = "*" if key is None else text(key)
            if key_end is not None and key is not None:
                val = _span(int.from_bytes(key, "big"), int.from_bytes(key_end, "big"), size, text)
            elems.append({"elem": {"val": val, **extra}} if extra else val)
    names: list[Any] = [n for i, n in enumerate(SET_FLAGS) if flags >> i & 1]
    rest = flags >> len(SET_FLAGS) << len(SET_FLAGS)
    named = {"type": TYPE_NAMES.get(kind, kind), "flags": names + ([rest] if rest else [])}
    return {**decoded, **named, "elem": elems}


def chain_item(body: memoryview, family: str) -> Json:
    """A chain as listed: a base chain's hook by name, with its priority and device beside it."""
    chain = {"family": family, **_decode(body, CHAIN, False)}
    hook = chain.pop("hook", None)
    if hook is not None:
        names, num = HOOKS.get(family, ()), hook.pop("hooknum", None)
        chain["hook"] = names[num] if isinstance(num, int) and num < len(names) else num
        devices = hook.pop("devs", None) or ([hook.pop("dev")] if "dev" in hook else [])
        hook.pop("dev", None)  # 6.18 lists a device both ways; 6.1 one of them; libnftables one name as "dev"
        chain.update(hook, **({"dev": devices[0] if len(devices) == 1 else devices} if devices else {}))
    return chain


def object_item(body: memoryview, family: str) -> Json:
    """A named counter as libnftables lists it ({"counter": {..., "packets", "bytes"}}); another object
    kind as {"object": ...} with its data in hex."""
    obj = {"family": family, **_decode(body, OBJ, False)}
    if obj.get("type") != nx.NFT_OBJECT_COUNTER:
        return {"object": obj}
    counts = _decode(memoryview(bytes.fromhex(obj.pop("data", ""))), COUNTER)
    return {"counter": {k: v for k, v in obj.items() if k != "type"} | counts}


def rule_item(body: memoryview, family: str) -> Json:
    rule = {"family": family, "expr": [], **_decode(body, RULE, False)}
    return {k: v for k, v in rule.items() if k != "comment" or v is not None}


def _by_name(obj: Json) -> tuple[str, str]:
    """decide_a and decide_b in one place: the order does not depend on the variant in force."""
    return neutral_name(str(obj.get("name", ""))), str(obj.get("name", ""))


def _inline(rules: list[Json], anonymous: dict[str, Json]) -> set[str]:
    """Anonymous sets written into the lookups that read them (their kernel names, __set0..., differ from
    table to table); returns the names of those bound so."""
    bound = set()
    for rule in rules:
        for expr in rule["expr"]:
            lookup = expr.get("lookup")
            if isinstance(lookup, dict) and lookup.get("set") in anonymous:
                bound.add(lookup["set"])
                own = anonymous[lookup["set"]].items()
                lookup["set"] = {k: v for k, v in own if k not in ("family", "table", "name", "handle")}
    return bound


class _Reply(DumpReader):
    """One request's reply, on a kept socket (not strict); a plain GET's is one message, no NLMSG_DONE."""

    strict = False

    def __init__(self, seq: int, kind: int, dump: bool) -> None:
        super().__init__(seq)
        self.kind, self.dump = kind, dump
        self.bodies: list[memoryview] = []

    def message(self, body: memoryview) -> None:
        self.bodies.append(body)
        self.done = not self.dump


def _request(kind: int, family: int, body: bytes, dump: bool) -> Callable[[int], bytes]:
    flags = nfnl.NLM_F_REQUEST | (nfnl.NLM_F_DUMP if dump else 0)
    payload = nfnl.NFGENMSG.pack(family, nfnl.NFNETLINK_V0, 0) + body
    head = (nfnl.NLMSGHDR.size + len(payload), (nfnl.NFNL_SUBSYS_NFTABLES << 8) | kind, flags)
    return lambda seq: nfnl.NLMSGHDR.pack(*head, seq, 0) + payload


class ListingSocket:
    """A NETLINK_NETFILTER socket kept for listings in egressd's own namespace, one at a time: closing one
    takes the kernel's commit lock (it looks for tables the socket owned), and making one costs too."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = threading.Lock()
        self._seq = 0

    @classmethod
    def open(cls) -> ListingSocket:
        """Raises OSError."""
        return cls(nfnl.netfilter_socket())

    def ask(self, kind: int, request: Callable[[int], bytes], dump: bool = True) -> list[memoryview] | None:
        """The bodies (after nfgenmsg) of the reply to one GET `kind`; None when the kernel says ENOENT."""
        seq = self._seq = self._seq % 0x7FFF0000 + 1
        reader = nfnl.exchange(self._sock, request(seq), _Reply(seq, kind - 1, dump))
        return None if reader.missing else reader.bodies

    def get(self, kind: int, family: str, body: bytes = b"", dump: bool = True) -> list[memoryview] | None:
        return self.ask(kind, _request(kind, FAMILIES.get(family, 0), body, dump), dump)

    def generation(self) -> int:
        got = self.get(GETGEN, "unspec", dump=False)
        return _u32(attributes(got[0], (NFTA_GEN_ID,))[NFTA_GEN_ID]) if got else -1

    def read(self, table: str, family: str = "netdev", chains: Iterable[str] = ()) -> list[Json] | None:
        """`family table` as a listing (see the module's doc), its chains found by their rules, their jumps
        and the names in `chains`; None when there is no such table. Raises NetlinkError."""
        with self._lock:
            for _ in range(ATTEMPTS):
                before = self.generation()
                try:
                    listing = _snapshot(self, family, table, chains)
                except (ValueError, KeyError, IndexError, struct.error) as e:
                    raise NetlinkError(f"malformed object in the listing of {table}: {e!r}") from None
                if self.generation() == before:
                    return listing
        raise NetlinkError(f"the ruleset changed during each of {ATTEMPTS} reads of {table}")

    def table_names(self, family: str) -> list[str]:
        """Every table of the family, in one dump. Raises NetlinkError."""
        with self._lock:
            return [_str(attributes(b, (NAMED,))[NAMED]) for b in self.get(GETTABLE, family) or ()]

    def comments(self, table: str, chain: str, family: int) -> list[str | None] | None:
        """nfnl.chain_comments() on this kept socket. Raises NetlinkError."""
        with self._lock:
            seq = self._seq = self._seq % 0x7FFF0000 + 1
            return nfnl.chain_comments(self._sock, table, chain, seq, family)

    def close(self) -> None:
        with self._lock:
            self._sock.close()


def _snapshot(sock: ListingSocket, family: str, table: str, chains: Iterable[str]) -> list[Json] | None:
    """Every part of the table, each by the narrowest request the kernel answers; None when it is gone."""
    named = attr(NAMED, table.encode() + b"\0")
    got = sock.get(GETTABLE, family, named, dump=False)
    parts = [sock.get(kind, family, named) for kind in (GETRULE, GETSET, GETOBJ)] if got else []
    if not got or parts[0] is None or parts[1] is None or parts[2] is None:
        return None  # ENOENT: gone, or gone while being read (the generation tells)
    rules = [rule_item(b, family) for b in parts[0]]
    sets = []
    for body in parts[1]:
        decoded = {"family": family, **_decode(body, SET, False)}
        request = lambda seq, n=decoded["name"]: getsetelem_request(family, table, n, seq)  # noqa: E731
        sets.append(set_item(decoded, element_rows(sock.ask(GETSETELEM, request) or ())))
    objects = [object_item(b, family) for b in parts[2]]
    bound = _inline(rules, {s["name"]: s for s in sets if "anonymous" in s["flags"]})
    jumps = {e[v]["target"] for r in rules for e in r["expr"] for v in ("jump", "goto") if v in e}
    found = []
    for name in sorted({*chains, *(r["chain"] for r in rules), *jumps}):
        chain = sock.get(GETCHAIN, family, named + attr(NFTA_CHAIN_NAME, name.encode() + b"\0"), False)
        found += [chain_item(chain[0], family)] if chain else []
    # NFTA_TABLE_USE counts chains, named sets, objects and flowtables; a bound anonymous set is not counted
    use = _u32(attributes(got[0], (NFTA_TABLE_USE,))[NFTA_TABLE_USE]) - len(sets) + len(bound) - len(objects)
    if use != len(found):  # a chain no rule is in and nothing jumps to (or a flowtable): every chain
        every = sock.get(GETCHAIN, family) or ()
        found = [chain_item(b, family) for b in every if _str(attributes(b, (NAMED,))[NAMED]) == table]
    head = {"table": {"family": family, **_decode(got[0], TABLE, False)}}
    unexplained = use - len(found)  # a flowtable (it judges no packet): the listing still changes
    found.sort(key=_by_name)
    order = {c["name"]: i for i, c in enumerate(found)}
    return [
        head,
        *({"set": s} for s in sorted(sets, key=_by_name) if s["name"] not in bound),
        *sorted(objects, key=lambda item: _by_name(next(iter(item.values())))),
        *({"chain": c} for c in found),
        *({"rule": r} for r in sorted(rules, key=lambda r: order.get(r["chain"], len(order)))),
        *([{"uncounted": {"objects": unexplained}}] if unexplained else []),
    ]
