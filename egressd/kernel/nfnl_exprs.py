"""Rule expressions and set elements as nf_tables netlink attributes, for nfnl_batch.py: what libnftables
1.0.6 sends for the expressions the host-side tables are made of, and nothing else.

A rule's JSON statements become expressions the way libnftables linearizes them (src/netlink_linearize.c):
a match loads its left side into register 1 (meta or payload, with the dependency libnftables inserts before
a network or transport header: `meta protocol` for ip/ip6 in netdev, `meta l4proto` for icmpv6/tcp/udp),
then compares it (cmp), looks it up in a set (lookup; an anonymous constant set is emitted before the rule,
bound by its set id), or masks it first (bitwise, for a prefix that does not end on a byte, and for `&`). A
byte-aligned prefix loads only its bytes. Verdicts are immediates; `counter "name"` is an objref; `meta mark
set` is meta + bitwise + meta. Every value is encoded in the byte order of its field. Anything else raises
EncodeError: the batch is never sent.

Field ids, datatypes and set userdata are nftables 1.0.6's (src/proto.c, src/datatype.c, include/proto.h),
checked byte by byte against what `nft -j -f` sends (strace): tests/integration/test_nfnl_batch.py.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from egressd.kernel.nfnl import attr, nested

NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2, 1, 2
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 1, 3, 4, 6
NFT_SET_ELEM_INTERVAL_END = 1
NFT_SET_ANONYMOUS, NFT_SET_CONSTANT, NFT_SET_INTERVAL = 0x1, 0x2, 0x4
NFT_REG_VERDICT, NFT_REG_1 = 0, 1
NFT_META_PROTOCOL, NFT_META_MARK, NFT_META_L4PROTO = 1, 3, 16
NFT_CMP_EQ, NFT_CMP_NEQ, NFT_LOOKUP_F_INV, NFT_OBJECT_COUNTER = 0, 1, 1, 1
VERDICTS = {"drop": 0, "accept": 1, "continue": -1, "jump": -3, "goto": -4, "return": -5}
# nftables' set userdata (libnftnl udata.h): key byte order, merge flag, the key's `typeof` expression
UDATA_KEYBYTEORDER, UDATA_MERGE_ELEMENTS, UDATA_KEY_TYPEOF = 0, 2, 3
UDATA_ELEM_FLAGS, ELEM_F_INTERVAL_OPEN = 1, 1
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


class EncodeError(ValueError):
    """A command or expression this encoder does not know: nothing was sent."""


def u32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!I", value & 0xFFFFFFFF))


def strz(kind: int, value: str) -> bytes:
    return attr(kind, value.encode() + b"\0")


def udata(kind: int, value: bytes) -> bytes:
    """One libnftnl userdata record: type, length, value (no alignment)."""
    return bytes((kind, len(value))) + value


def data_value(kind: int, value: bytes) -> bytes:
    return nested(kind, attr(NFTA_DATA_VALUE, value))


def verdict_data(kind: int, code: int, chain: str | None = None) -> bytes:
    body = u32(NFTA_VERDICT_CODE, code) + (strz(NFTA_VERDICT_CHAIN, chain) if chain else b"")
    return nested(kind, nested(NFTA_DATA_VERDICT, body))


def expression(name: str, *attrs: bytes) -> bytes:
    return nested(NFTA_LIST_ELEM, strz(NFTA_EXPR_NAME, name) + nested(NFTA_EXPR_DATA, b"".join(attrs)))


def set_udata(order: int, merge: bool = False, typeof: bytes = b"") -> bytes:
    out = udata(UDATA_KEYBYTEORDER, struct.pack("=I", order))
    if merge:
        out += udata(UDATA_MERGE_ELEMENTS, struct.pack("=I", 1))
    return out + (udata(UDATA_KEY_TYPEOF, typeof) if typeof else b"")


def _named(size: int, names: dict[str, int], order: str = "!") -> Callable[[Any], bytes]:
    fmt = order + {1: "B", 2: "H", 4: "I"}[size]

    def encode(value: Any) -> bytes:
        number = names.get(value) if isinstance(value, str) else value
        if not isinstance(number, int) or isinstance(number, bool):
            raise EncodeError(f"value {value!r} is not one this field takes")
        try:
            return struct.pack(fmt, number)
        except struct.error:
            raise EncodeError(f"value {value!r} does not fit the field") from None

    return encode


def address(version: int) -> Callable[[Any], bytes]:
    def encode(value: Any) -> bytes:
        try:
            return (ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address)(value).packed
        except ValueError:
            raise EncodeError(f"{value!r} is not an IPv{version} address") from None

    return encode


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
    encode = _named(size, names, "!" if order == BIG else "=")
    return Field(("meta", key, 0), size, dtype, order, typeof, encode)


def _payload(proto: tuple[int, int], where: tuple[int, int, int], dtype: int, **kw: Any) -> Field:
    (desc, field_id), (base, offset, size) = proto, where
    inner = udata(0, struct.pack("=I", desc)) + udata(1, struct.pack("=I", field_id))
    if dtype == TYPE_INTEGER:  # a plain integer: libnftables adds its width in bits
        inner += udata(4, struct.pack("=I", 8 * size))
    typeof = udata(0, struct.pack("=I", EXPR_PAYLOAD)) + udata(1, inner)
    version = kw.pop("version", 0)
    encode = address(version) if version else _named(size, kw.pop("names", {}))
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


def address_range(value: Any, version: int) -> tuple[int, int]:
    """An address, {"prefix": {"addr", "len"}} or {"range": [low, high]} as the first and last address."""
    cls = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    try:
        if isinstance(value, str) and "/" not in value:  # libnftables JSON writes a prefix as "prefix"
            return int(cls(value).network_address), int(cls(value).network_address)
        if isinstance(value, dict) and set(value) == {"prefix"} and set(value["prefix"]) == {"addr", "len"}:
            net = cls(f"{value['prefix']['addr']}/{value['prefix']['len']}")
            return int(net.network_address), int(net.broadcast_address)
        if isinstance(value, dict) and set(value) == {"range"} and len(value["range"]) == 2:
            low, high = (int(cls(v).network_address) for v in value["range"])
            if low <= high:
                return low, high
    except (TypeError, ValueError):
        pass
    raise EncodeError(f"{value!r} is not an IPv{version} address, prefix or range")


def element(key: bytes, flags: int = 0, timeout_ms: int | None = None, open_end: bool = False) -> bytes:
    body = u32(NFTA_SET_ELEM_FLAGS, flags) if flags else b""
    if timeout_ms is not None:
        body += attr(NFTA_SET_ELEM_TIMEOUT, struct.pack("!Q", timeout_ms))
    body += data_value(NFTA_SET_ELEM_KEY, key)
    if open_end:  # a range up to the last address has no end element: libnftables marks it open
        body += attr(NFTA_SET_ELEM_USERDATA, udata(UDATA_ELEM_FLAGS, struct.pack("=I", ELEM_F_INTERVAL_OPEN)))
    return nested(NFTA_LIST_ELEM, body)


def interval_elements(
    ranges: list[tuple[int, int]], size: int, merge: bool, first_zero: bool
) -> tuple[list[bytes], int]:
    """Ranges as libnftables sends them to an empty interval set: sorted, each a start and an end one past
    its last value (flagged INTERVAL_END), after an end element at 0 if first_zero and the first starts
    above 0. merge (anonymous sets): overlapping and adjacent ranges become one; else overlaps are refused.
    With the number of elements libnftables declares (an open range's missing end counts)."""
    merged: list[tuple[int, int]] = []
    for low, high in sorted(ranges):
        if merged and low <= merged[-1][1] + (1 if merge else 0):
            if not merge:
                raise EncodeError("overlapping intervals in one set")
            merged[-1] = (merged[-1][0], max(merged[-1][1], high))
        else:
            merged.append((low, high))
    top = (1 << (8 * size)) - 1
    out = [element(bytes(size), NFT_SET_ELEM_INTERVAL_END)] if merged and merged[0][0] and first_zero else []
    for low, high in merged:
        out.append(element(low.to_bytes(size, "big"), open_end=high == top))
        if high != top:
            out.append(element((high + 1).to_bytes(size, "big"), NFT_SET_ELEM_INTERVAL_END))
    return out, len(out) + (merged[-1][1] == top if merged else 0)


@dataclass(frozen=True)
class AnonSet:
    """An anonymous constant set a rule looks up: sent (NEWSET, NEWSETELEM) right before its rule."""

    set_id: int
    flags: int
    key: Field
    values: list[Any]  # as the rule gives them: keys, or addresses, prefixes and ranges (NFT_SET_INTERVAL)


def _load(f: Field, size: int | None = None) -> bytes:
    kind, key, offset = f.load
    if kind == "meta":
        return expression("meta", u32(2, key), u32(1, NFT_REG_1))  # NFTA_META_KEY, NFTA_META_DREG
    # NFTA_PAYLOAD_DREG, _BASE, _OFFSET, _LEN
    return expression("payload", u32(1, NFT_REG_1), u32(2, key), u32(3, offset), u32(4, size or f.size))


def _cmp(op: str, value: bytes) -> bytes:
    code = NFT_CMP_EQ if op == "==" else NFT_CMP_NEQ  # NFTA_CMP_SREG, _OP, _DATA
    return expression("cmp", u32(1, NFT_REG_1), u32(2, code), data_value(3, value))


def _bitwise(mask: bytes, xor: bytes, boolean_op: bool = True) -> bytes:
    """reg 1 = (reg 1 & mask) ^ xor. libnftables names the operation for `&`/`|` and not for a prefix."""
    op = u32(6, 0) if boolean_op else b""  # NFTA_BITWISE_OP: NFT_BITWISE_BOOL
    regs = u32(1, NFT_REG_1) + u32(2, NFT_REG_1) + op + u32(3, len(mask))
    return expression("bitwise", regs, data_value(4, mask), data_value(5, xor))


def _verdict(kind: str, chain: str | None = None) -> bytes:
    return expression("immediate", u32(1, NFT_REG_VERDICT), verdict_data(2, VERDICTS[kind], chain))


class RuleEncoder:
    """One rule's statements as expressions (`exprs`), and the anonymous sets they need (`anon`).

    set_id(name): the set id of a named set made earlier in the same batch (None: one already there);
    new_set_id(): a fresh id for an anonymous set."""

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
            self.exprs.append(_verdict(kind))
        elif kind in ("jump", "goto") and isinstance(arg, dict) and [*arg] == ["target"]:
            self.exprs.append(_verdict(kind, arg["target"]))
        elif kind == "match" and isinstance(arg, dict) and set(arg) == {"op", "left", "right"}:
            self._match(arg["op"], arg["left"], arg["right"])
        elif kind == "counter" and isinstance(arg, str):  # a named counter: objref
            self.exprs.append(expression("objref", u32(1, NFT_OBJECT_COUNTER), attr(2, arg.encode())))
        elif kind == "counter" and arg is None:
            self.exprs.append(expression("counter"))
        elif kind == "mangle" and isinstance(arg, dict) and set(arg) == {"key", "value"}:
            self._mangle(arg["key"], arg["value"])
        else:
            raise EncodeError(f"unsupported statement {stmt!r}")

    def _field(self, left: Any) -> tuple[Field, Any]:
        """The field a match's left side loads, and the mask of a `&` around it (None: no mask)."""
        ((kind, arg),) = left.items() if isinstance(left, dict) and len(left) == 1 else ((None, None),)
        if kind == "&" and isinstance(arg, list) and len(arg) == 2 and isinstance(arg[1], int):
            f, mask = self._field(arg[0])
            if mask is None and not f.version:
                return f, arg[1]
        elif kind == "meta" and isinstance(arg, dict) and set(arg) == {"key"} and arg["key"] in META:
            return META[arg["key"]], None
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
            self.exprs += [_load(META["protocol"]), _cmp("==", META["protocol"].encode(f.network))]
            self._network = f.network
        if f.l4 is not None and self._l4 != f.l4:
            if self._l4 is not None:
                raise EncodeError("conflicting transport protocols in one rule")
            self.exprs += [_load(META["l4proto"]), _cmp("==", bytes((f.l4,)))]
            self._l4 = f.l4

    def _match(self, op: Any, left: Any, right: Any) -> None:
        if op not in ("==", "!="):
            raise EncodeError(f"unsupported match operator {op!r}")
        f, mask = self._field(left)
        self._depend(f)
        if isinstance(right, dict) and set(right) == {"prefix"} and mask is None:
            return self._prefix(f, op, right)
        self.exprs.append(_load(f))
        if mask is not None:
            self.exprs.append(_bitwise(f.encode(mask), bytes(f.size)))
        if isinstance(right, str) and right.startswith("@"):
            self._lookup(op, right[1:], self._set_id(right[1:]))
        elif isinstance(right, dict) and set(right) == {"set"} and isinstance(right["set"], list):
            anon = self._anonymous(f, right["set"])
            self._lookup(op, "__set%d", anon.set_id)
        else:
            self.exprs.append(_cmp(op, f.encode(right)))
        # What an explicit match requires stands in for the dependency; a set of protocols leaves a
        # transport header ambiguous (libnftables refuses `meta l4proto {tcp, udp} tcp dport 53` too).
        single = op == "==" and mask is None and isinstance(right, (int, str)) and str(right)[:1] != "@"
        if f is META["protocol"] and single:
            self._network = next((k for k, v in ETHERTYPES.items() if f.encode(v) == f.encode(right)), "?")
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
            self.exprs += [_load(f, bits // 8), _cmp(op, key[: bits // 8])]
        else:
            mask = (((1 << (8 * f.size)) - 1) ^ (high - low)).to_bytes(f.size, "big")
            self.exprs += [_load(f), _bitwise(mask, bytes(f.size), False), _cmp(op, key)]

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
            self.exprs += [_load(mark), _bitwise(mark.encode(mask), mark.encode(xor))]
        else:
            raise EncodeError(f"unsupported mark value {value!r}")
        self.exprs.append(expression("meta", u32(2, NFT_META_MARK), u32(3, NFT_REG_1)))  # KEY, SREG
