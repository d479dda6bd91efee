"""Rule expressions as nf_tables netlink attributes, for nfnl_encode.py: what libnftables 1.0.6 sends for
the expressions the host-side tables (family netdev) are made of, and nothing else; nfnl_inet.py adds what a
sandbox's own table (family inet) needs. The values they are made of (attributes, set elements, intervals)
are in nfnl_values.py.

A rule's JSON statements become expressions the way libnftables linearizes them (src/netlink_linearize.c):
a match loads its left side into register 1 (meta or payload, with the dependency libnftables inserts before
a network or transport header: `meta protocol` for ip/ip6 in netdev, `meta l4proto` for icmpv6/tcp/udp),
then compares it (cmp), looks it up in a set (lookup; an anonymous constant set is emitted before the rule,
bound by its set id), or masks it first (bitwise, for a prefix that does not end on a byte, and for `&`). A
byte-aligned prefix loads only its bytes. Verdicts are immediates; `counter "name"` is an objref; `meta mark
set` is meta + bitwise + meta; `limit` and `log` (one expression each) are nfnl_stmts.py's. Every value is
encoded in the byte order of its field. Anything else raises EncodeError: the batch is never sent.

Field ids, datatypes and set userdata are nftables 1.0.6's (src/proto.c, src/datatype.c, include/proto.h),
checked byte by byte against what `nft -j -f` sends (strace): tests/integration/test_nfnl_batch.py.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from egressd.kernel.nfnl import attr
from egressd.kernel.nfnl_stmts import STATEMENTS

# Values moved to nfnl_values.py, still offered here by their old names (nfnl_listing.py reads some)
from egressd.kernel.nfnl_values import ELEM_F_INTERVAL_OPEN as ELEM_F_INTERVAL_OPEN
from egressd.kernel.nfnl_values import NFT_SET_ELEM_INTERVAL_END as NFT_SET_ELEM_INTERVAL_END
from egressd.kernel.nfnl_values import NFTA_DATA_VALUE as NFTA_DATA_VALUE
from egressd.kernel.nfnl_values import NFTA_DATA_VERDICT as NFTA_DATA_VERDICT
from egressd.kernel.nfnl_values import NFTA_EXPR_DATA as NFTA_EXPR_DATA
from egressd.kernel.nfnl_values import NFTA_EXPR_NAME as NFTA_EXPR_NAME
from egressd.kernel.nfnl_values import NFTA_LIST_ELEM as NFTA_LIST_ELEM
from egressd.kernel.nfnl_values import NFTA_SET_ELEM_FLAGS as NFTA_SET_ELEM_FLAGS
from egressd.kernel.nfnl_values import NFTA_SET_ELEM_KEY as NFTA_SET_ELEM_KEY
from egressd.kernel.nfnl_values import NFTA_SET_ELEM_TIMEOUT as NFTA_SET_ELEM_TIMEOUT
from egressd.kernel.nfnl_values import NFTA_SET_ELEM_USERDATA as NFTA_SET_ELEM_USERDATA
from egressd.kernel.nfnl_values import NFTA_VERDICT_CHAIN as NFTA_VERDICT_CHAIN
from egressd.kernel.nfnl_values import NFTA_VERDICT_CODE as NFTA_VERDICT_CODE
from egressd.kernel.nfnl_values import UDATA_ELEM_FLAGS as UDATA_ELEM_FLAGS
from egressd.kernel.nfnl_values import UDATA_KEY_TYPEOF as UDATA_KEY_TYPEOF
from egressd.kernel.nfnl_values import UDATA_KEYBYTEORDER as UDATA_KEYBYTEORDER
from egressd.kernel.nfnl_values import UDATA_MERGE_ELEMENTS as UDATA_MERGE_ELEMENTS
from egressd.kernel.nfnl_values import (
    EncodeError,
    address,
    data_value,
    expression,
    named,
    strz,
    u32,
    udata,
    verdict_data,
)
from egressd.kernel.nfnl_values import address_range as address_range
from egressd.kernel.nfnl_values import element as element
from egressd.kernel.nfnl_values import interval_elements as interval_elements
from egressd.kernel.nfnl_values import set_udata as set_udata

NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL = 0x1, 0x2, 0x4
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_META_PROTOCOL, NFT_META_MARK, NFT_META_L4PROTO = 1, 3, 16
NFT_CMP_EQ, NFT_CMP_NEQ, NFT_LOOKUP_F_INV, NFT_OBJECT_COUNTER = 0, 1, 1, 1
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "jump": -3, "goto": -4, "return": -5}
HOST, BIG = 1, 2  # nftables' byteorder enum
EXPR_PAYLOAD, EXPR_META = 7, 9  # nftables' expression types, in a set's typeof userdata
TYPE_MARK, TYPE_IPADDR, TYPE_IP6ADDR, TYPE_INTEGER = 19, 7, 8, 4
TYPE_ETHERTYPE, TYPE_INET_PROTOCOL, TYPE_INET_SERVICE, TYPE_ICMP6_TYPE = 10, 12, 13, 29

ETHERTYPES = {"ip": 0x0800, "ip6": 0x86DD, "arp": 0x0806}
L4PROTOS = {"icmp": 1, "tcp": 6, "udp": 17, "icmpv6": 58, "ipv6-icmp": 58}
ICMP6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
    "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
    "mld-listener-done": 132, "mld-listener-reduction": 132, "nd-router-solicit": 133,
    "nd-router-advert": 134, "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
    "router-renumbering": 138, "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142,
    "mld2-listener-report": 143,
}  # fmt: skip


@dataclass(frozen=True)
class Field:
    """The left side of a match: how it is loaded and what its values look like."""

    load: tuple[str, int, int]  # ("meta", key, 0) or ("payload", base, offset)
    size: int
    dtype: int  # nftables datatype, a set key's type
    order: int  # byte order, in an anonymous set's userdata
    typeof: bytes  # the key's typeof, in an anonymous set's userdata
    encode: Callable[[Any], bytes] = field(compare=False)
    network: str | None = None  # needs `meta protocol` (netdev)
    l4: int | None = None  # needs `meta l4proto`
    version: int = 0  # an address field: prefixes and intervals


def _meta(key: int, size: int, dtype: int, names: dict[str, int], order: int = HOST) -> Field:
    typeof = udata(0, struct.pack("=I", EXPR_META)) + udata(1, udata(0, struct.pack("=I", key)))
    encode = named(size, names, "!" if order == BIG else "=")
    return Field(("meta", key, 0), size, dtype, order, typeof, encode)


def _payload(proto: tuple[int, int], where: tuple[int, int, int], dtype: int, **kw: Any) -> Field:
    (desc, field_id), (base, offset, size) = proto, where
    inner = udata(0, struct.pack("=I", desc)) + udata(1, struct.pack("=I", field_id))
    if dtype == TYPE_INTEGER:  # a plain integer: libnftables adds its width in bits
        inner += udata(4, struct.pack("=I", 8 * size))
    typeof = udata(0, struct.pack("=I", EXPR_PAYLOAD)) + udata(1, inner)
    version = kw.pop("version", 0)
    encode = address(version) if version else named(size, kw.pop("names", {}))
    return Field(("payload", base, offset), size, dtype, BIG, typeof, encode, version=version, **kw)


NH, TH = 1, 2  # NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER
DESC_UDP, DESC_TCP, DESC_TH, DESC_IP, DESC_IP6, DESC_ICMP6 = 6, 8, 11, 12, 13, 14
META = {
    "l4proto": _meta(NFT_META_L4PROTO, 1, TYPE_INET_PROTOCOL, L4PROTOS),
    "protocol": _meta(NFT_META_PROTOCOL, 2, TYPE_ETHERTYPE, ETHERTYPES, BIG),
    "mark": _meta(NFT_META_MARK, 4, TYPE_MARK, {}),
}
PAYLOAD = {
    ("ip", "saddr"): _payload((DESC_IP, 11), (NH, 12, 4), TYPE_IPADDR, network="ip", version=4),
    ("ip", "daddr"): _payload((DESC_IP, 12), (NH, 16, 4), TYPE_IPADDR, network="ip", version=4),
    ("ip6", "hoplimit"): _payload((DESC_IP6, 7), (NH, 7, 1), TYPE_INTEGER, network="ip6"),
    ("ip6", "saddr"): _payload((DESC_IP6, 8), (NH, 8, 16), TYPE_IP6ADDR, network="ip6", version=6),
    ("ip6", "daddr"): _payload((DESC_IP6, 9), (NH, 24, 16), TYPE_IP6ADDR, network="ip6", version=6),
    ("icmpv6", "type"): _payload(
        (DESC_ICMP6, 1), (TH, 0, 1), TYPE_ICMP6_TYPE, network="ip6", l4=58, names=ICMP6_TYPES
    ),
    **{
        (proto, port): _payload((desc, i + 1), (TH, 2 * i, 2), TYPE_INET_SERVICE, l4=l4)
        for proto, desc, l4 in (("th", DESC_TH, None), ("tcp", DESC_TCP, 6), ("udp", DESC_UDP, 17))
        for i, port in enumerate(("sport", "dport"))
    },
}


@dataclass(frozen=True)
class AnonSet:
    """An anonymous constant set a rule looks up: sent (NEWSET, NEWSETELEM) right before its rule."""

    set_id: int
    flags: int
    key: Field
    values: list[Any]  # as the rule gives them: keys, or addresses, prefixes and ranges (NFT_SET_INTERVAL)


def load(f: Field, size: int | None = None) -> bytes:
    kind, key, offset = f.load
    if kind in ("meta", "ct"):  # NFTA_META_KEY, NFTA_META_DREG (NFTA_CT_KEY, NFTA_CT_DREG: the same)
        return expression(kind, u32(2, key), u32(1, NFT_REG_1))
    # NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
    return expression("payload", u32(1, NFT_REG_1), u32(2, key), u32(3, offset), u32(4, size or f.size))


def cmp(op: str, value: bytes) -> bytes:
    code = NFT_CMP_EQ if op == "==" else NFT_CMP_NEQ  # NFTA_CMP_SREG, _OP, _DATA
    return expression("cmp", u32(1, NFT_REG_1), u32(2, code), data_value(3, value))


def bitwise(mask: bytes, xor: bytes, boolean_op: bool = True) -> bytes:
    """reg 1 = (reg 1 & mask) ^ xor. libnftables names the operation for `&`/`|` and not for a prefix."""
    op = u32(6, 0) if boolean_op else b""  # NFTA_BITWISE_OP: NFT_BITWISE_BOOL
    regs = u32(1, NFT_REG_1) + u32(2, NFT_REG_1) + op + u32(3, len(mask))
    return expression("bitwise", regs, data_value(4, mask), data_value(5, xor))


def verdict(kind: str, chain: str | None = None) -> bytes:
    return expression("immediate", u32(1, NFT_REG_VERDICT), verdict_data(2, VERDICTS[kind], chain))


class RuleEncoder:
    """One rule's statements as expressions (`exprs`), and the anonymous sets they need (`anon`).

    set_id(name): the set id of a named set made earlier in the same batch (None: one already there);
    new_set_id(): a fresh id for an anonymous set. For family netdev; nfnl_inet.InetRuleEncoder: inet."""

    FIELDS: dict[tuple[str, str], Field] = {("meta", k): f for k, f in META.items()}  # meta and ct keys
    NETWORK = META["protocol"]  # what an ip or ip6 header field depends on

    def __init__(self, set_id: Callable[[str], int | None], new_set_id: Callable[[], int]) -> None:
        self.exprs: list[bytes] = []
        self.anon: list[AnonSet] = []
        self._set_id = set_id
        self._new_set_id = new_set_id
        self._network: str | None = None  # what the rule already requires of the packet
        self._l4: int | None = None

    def statement(self, stmt: Any) -> None:
        ((kind, arg),) = stmt.items() if isinstance(stmt, dict) and len(stmt) == 1 else ((None, None),)
        if kind in ("accept", "drop", "continue", "return") and arg is None:
            self.exprs.append(verdict(kind))
        elif kind in ("jump", "goto") and isinstance(arg, dict) and [*arg] == ["target"]:
            self.exprs.append(verdict(kind, arg["target"]))
        elif kind == "match" and isinstance(arg, dict) and set(arg) == {"op", "left", "right"}:
            self._match(arg["op"], arg["left"], arg["right"])
        elif kind == "counter" and isinstance(arg, str):  # a named counter: objref
            self.exprs.append(expression("objref", u32(1, NFT_OBJECT_COUNTER), attr(2, arg.encode())))
        elif kind == "counter" and arg is None:
            self.exprs.append(expression("counter"))
        elif kind == "mangle" and isinstance(arg, dict) and set(arg) == {"key", "value"}:
            self._mangle(arg["key"], arg["value"])
        elif kind in STATEMENTS:  # limit, log
            self.exprs.append(STATEMENTS[kind](arg))
        else:
            raise EncodeError(f"unsupported statement {stmt!r}")

    def _field(self, left: Any) -> tuple[Field, Any]:
        """The field a match's left side loads, and the mask of a `&` around it (None: no mask)."""
        ((kind, arg),) = left.items() if isinstance(left, dict) and len(left) == 1 else ((None, None),)
        if kind == "&" and isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], int):
            f, mask = self._field(arg[0])
            if mask is None and not f.version:
                return f, arg[1]
        elif kind in ("meta", "ct") and isinstance(arg, dict) and [*arg] == ["key"]:
            if (kind, arg["key"]) in self.FIELDS:
                return self.FIELDS[kind, arg["key"]], None
        elif kind == "payload" and isinstance(arg, dict) and set(arg) == {"protocol", "field"}:
            found = PAYLOAD.get((arg["protocol"], arg["field"]))
            if found is not None:
                return found, None
        raise EncodeError(f"unsupported match left side {left!r}")

    def _depend(self, f: Field) -> None:
        """The implicit matches libnftables puts before a header field: its network, then its transport."""
        if f.network and self._network != f.network:
            if self._network is not None:
                raise EncodeError(f"conflicting protocols in one rule: {self._network} and {f.network}")
            self.exprs += [load(self.NETWORK), cmp("==", self.NETWORK.encode(f.network))]
            self._network = f.network
        if f.l4 is not None and self._l4 != f.l4:
            if self._l4 is not None:
                raise EncodeError("conflicting transport protocols in one rule")
            self.exprs += [load(META["l4proto"]), cmp("==", bytes((f.l4,)))]
            self._l4 = f.l4

    def _match(self, op: Any, left: Any, right: Any) -> None:
        if op not in ("==", "!="):
            raise EncodeError(f"unsupported match operator {op!r}")
        f, mask = self._field(left)
        self._depend(f)
        if isinstance(right, dict) and set(right) == {"prefix"} and mask is None:
            return self._prefix(f, op, right)
        self.exprs.append(load(f))
        if mask is not None:
            self.exprs.append(bitwise(f.encode(mask), bytes(f.size)))
        if isinstance(right, str) and right.startswith("@"):
            self._lookup(op, right[1:], self._set_id(right[1:]))
        elif isinstance(right, dict) and set(right) == {"set"} and isinstance(right["set"], list):
            anon = self._anonymous(f, right["set"])
            self._lookup(op, "__set%d", anon.set_id)
        else:
            self.exprs.append(cmp(op, f.encode(right)))
        # What an explicit match requires stands in for the dependency; a set of protocols leaves a
        # transport header ambiguous (libnftables refuses `meta l4proto {tcp, udp} tcp dport 53` too).
        single = op == "==" and mask is None and isinstance(right, (int, str)) and str(right)[:1] != "@"
        if f is self.NETWORK and single:
            self._network = next((k for k in ("ip", "ip6") if f.encode(k) == f.encode(right)), "?")
        elif f is META["l4proto"]:
            self._l4 = f.encode(right)[0] if single else -1

    def _prefix(self, f: Field, op: str, right: Any) -> None:
        if not f.version:
            raise EncodeError(f"a prefix on a field that is not an address: {right!r}")
        low, high = address_range(right, f.version)
        bits = int(right["prefix"]["len"])
        key = low.to_bytes(f.size, "big")
        if not bits:
            raise EncodeError(f"a prefix of length 0 matches everything: {right!r}")
        if bits % 8 == 0:  # only the prefix's bytes are loaded and compared
            self.exprs += [load(f, bits // 8), cmp(op, key[: bits // 8])]
        else:
            mask = (((1 << (8 * f.size)) - 1) ^ (high - low)).to_bytes(f.size, "big")
            self.exprs += [load(f), bitwise(mask, bytes(f.size), False), cmp(op, key)]

    def _lookup(self, op: str, name: str, set_id: int | None) -> None:
        body = u32(2, NFT_REG_1) + strz(1, name)  # NFTA_LOOKUP_SREG, NFTA_LOOKUP_SET
        body += u32(4, set_id) if set_id is not None else b""  # NFTA_LOOKUP_SET_ID
        body += u32(5, NFT_LOOKUP_F_INV) if op == "!=" else b""  # NFTA_LOOKUP_FLAGS
        self.exprs.append(expression("lookup", body))

    def _anonymous(self, f: Field, values: list[Any]) -> AnonSet:
        if not values:
            raise EncodeError("an empty anonymous set")
        flags = NFT_SET_ANONYMOUS | NFT_SET_CONSTANT
        if any(isinstance(v, dict) for v in values):
            if not f.version:
                raise EncodeError(f"intervals in a set of a field that is not an address: {values!r}")
            flags |= NFT_SET_INTERVAL
        anon = AnonSet(self._new_set_id(), flags, f, list(values))
        self.anon.append(anon)
        return anon

    def _mangle(self, key: Any, value: Any) -> None:
        """`meta mark set`: to a constant, or to the mark with bits set (|), kept (&) or flipped (^)."""
        mark = META["mark"]
        if key != {"meta": {"key": "mark"}}:
            raise EncodeError(f"unsupported mangle of {key!r}")
        if isinstance(value, int) and not isinstance(value, bool):
            self.exprs.append(expression("immediate", u32(1, NFT_REG_1), data_value(2, mark.encode(value))))
        elif isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("|", "&", "^"):
            ((op, args),) = value.items()
            if not (isinstance(args, list) and len(args) == 2 and args[0] == key and type(args[1]) is int):
                raise EncodeError(f"unsupported mark value {value!r}")
            bits, ones = args[1] & 0xFFFFFFFF, 0xFFFFFFFF
            mask, xor = {"|": (ones ^ bits, bits), "&": (bits, 0), "^": (ones, bits)}[op]
            self.exprs += [load(mark), bitwise(mark.encode(mask), mark.encode(xor))]
        else:
            raise EncodeError(f"unsupported mark value {value!r}")
        self.exprs.append(expression("meta", u32(2, NFT_META_MARK), u32(3, NFT_REG_1)))  # KEY, SREG
