"""The expressions of a sandbox's own table (family inet) that the host-side tables do not use, as
libnftables 1.0.6 linearizes them (src/netlink_linearize.c), for nfnl_encode.py.

InetRuleEncoder is nfnl_exprs.RuleEncoder for family inet: an ip or ip6 header field depends on `meta
nfproto` there (not `meta protocol`, netdev's); and it knows the connection tracking keys egressd matches
(`ct mark`, `ct direction`, `ct status`, with the `!` flag test: load, mask, compare with zero), interface
names (`meta iifname`/`oifname`: the name NUL-padded to 16 bytes, compared whole), `ct mark set` to a chain
of `&`, `|` and `^` folded into one bitwise as libnftables folds it, `reject` (tcp reset after an explicit
`meta l4proto tcp`; icmpx with a code) and `redirect` to a port (after a transport protocol match).
Anything else raises EncodeError, as the base class does: the batch is never sent.

Keys, codes and flags are linux/netfilter/nf_tables.h's and nf_conntrack_common.h's, checked byte for byte
against what `nft -j -f` sends (strace): tests/integration/test_nfnl_sandbox.py.
"""

from __future__ import annotations

from typing import Any

from egressd.kernel.nfnl import attr
from egressd.kernel.nfnl_exprs import (
    HOST,
    NFT_REG_1,
    AnonSet,
    EncodeError,
    Field,
    RuleEncoder,
    bitwise,
    cmp,
    data_value,
    expression,
    load,
    named,
    u32,
)

NFT_META_IIFNAME, NFT_META_OIFNAME, NFT_META_NFPROTO = 6, 7, 15
NFT_CT_DIRECTION, NFT_CT_STATUS, NFT_CT_MARK = 1, 2, 3
NFTA_CT_KEY, NFTA_CT_SREG = 2, 4
NFTA_REJECT_TYPE, NFTA_REJECT_ICMP_CODE = 1, 2
NFT_REJECT_TCP_RST, NFT_REJECT_ICMPX_UNREACH = 1, 2
ICMPX_CODES = {"no-route": 0, "port-unreachable": 1, "host-unreachable": 2, "admin-prohibited": 3}
NFTA_REDIR_REG_PROTO_MIN, NFTA_REDIR_FLAGS = 1, 3
NF_NAT_RANGE_PROTO_SPECIFIED = 2
IFNAMSIZ = 16
NFPROTOS = {"ip": 2, "ip6": 10, "ipv4": 2, "ipv6": 10}  # NFPROTO_IPV4, NFPROTO_IPV6
CT_STATUS = {
    "expected": 0x1, "seen-reply": 0x2, "assured": 0x4, "confirmed": 0x8, "snat": 0x10, "dnat": 0x20,
    "dying": 0x200,
}  # fmt: skip


def _ifname(value: Any) -> bytes:
    """An interface name as libnftables compares it: all 16 bytes, NUL-padded (a `*` would compare a
    prefix only, and is not encoded here)."""
    if not isinstance(value, str) or "*" in value or "\\" in value or not 0 < len(value.encode()) < IFNAMSIZ:
        raise EncodeError(f"interface name {value!r}")
    return value.encode().ljust(IFNAMSIZ, b"\0")


def _field(kind: str, key: int, size: int, names: dict[str, int]) -> Field:
    """A meta or ct key in host byte order. No set type: anonymous sets of these are not encoded."""
    return Field((kind, key, 0), size, 0, HOST, b"", named(size, names, "="))


FIELDS = {
    **RuleEncoder.FIELDS,
    ("meta", "nfproto"): _field("meta", NFT_META_NFPROTO, 1, NFPROTOS),
    ("meta", "iifname"): Field(("meta", NFT_META_IIFNAME, 0), IFNAMSIZ, 0, HOST, b"", _ifname),
    ("meta", "oifname"): Field(("meta", NFT_META_OIFNAME, 0), IFNAMSIZ, 0, HOST, b"", _ifname),
    ("ct", "direction"): _field("ct", NFT_CT_DIRECTION, 1, {"original": 0, "reply": 1}),
    ("ct", "status"): _field("ct", NFT_CT_STATUS, 4, CT_STATUS),
    ("ct", "mark"): _field("ct", NFT_CT_MARK, 4, {}),
}
# What `mangle` may set, and the expression that stores register 1 there.
SETTABLE = {
    "ct mark": (FIELDS["ct", "mark"], expression("ct", u32(NFTA_CT_KEY, NFT_CT_MARK), u32(NFTA_CT_SREG, 1))),
}


def _binops(value: Any, key: Any, ones: int) -> tuple[int, int] | None:
    """key & a | b ^ c ... as one (mask, xor), as libnftables folds such a chain (netlink_gen_bitwise);
    None when value is not such a chain over key with integer operands."""
    if value == key:
        return ones, 0
    ((op, args),) = value.items() if isinstance(value, dict) and len(value) == 1 else ((None, None),)
    if op not in ("&", "|", "^") or not (isinstance(args, list) and len(args) == 2 and type(args[1]) is int):
        return None
    inner = _binops(args[0], key, ones)
    if inner is None:
        return None
    (mask, xor), bits = inner, args[1] & ones
    if op == "&":
        return mask & bits, xor & bits
    if op == "|":
        return mask & ~bits & ones, xor | bits
    return mask, xor ^ bits


class InetRuleEncoder(RuleEncoder):
    """RuleEncoder for a table of family inet: a sandbox's own."""

    FIELDS = FIELDS
    NETWORK = FIELDS["meta", "nfproto"]

    def statement(self, stmt: Any) -> None:
        ((kind, arg),) = stmt.items() if isinstance(stmt, dict) and len(stmt) == 1 else ((None, None),)
        if kind == "reject" and isinstance(arg, dict):
            self._reject(arg)
        elif kind == "redirect" and isinstance(arg, dict) and [*arg] == ["port"]:
            self._redirect(arg["port"])
        else:
            super().statement(stmt)

    def _reject(self, arg: dict[str, Any]) -> None:
        if arg == {"type": "tcp reset"}:
            if self._l4 != 6:  # libnftables would add the dependency; egressd always states it
                raise EncodeError("`reject with tcp reset` without an explicit `meta l4proto tcp` before it")
            kind, code = NFT_REJECT_TCP_RST, 0
        elif set(arg) == {"type", "expr"} and arg["type"] == "icmpx" and arg["expr"] in ICMPX_CODES:
            kind, code = NFT_REJECT_ICMPX_UNREACH, ICMPX_CODES[arg["expr"]]
        else:
            raise EncodeError(f"unsupported reject {arg!r}")
        code_attr = attr(NFTA_REJECT_ICMP_CODE, bytes((code,)))  # a u8
        self.exprs.append(expression("reject", u32(NFTA_REJECT_TYPE, kind), code_attr))

    def _redirect(self, port: Any) -> None:
        if type(port) is not int or not 0 < port < 65536:
            raise EncodeError(f"redirect to port {port!r}")
        if self._l4 is None:
            raise EncodeError("`redirect to` a port without a transport protocol match before it")
        immediate = expression("immediate", u32(1, NFT_REG_1), data_value(2, port.to_bytes(2, "big")))
        flags = u32(NFTA_REDIR_FLAGS, NF_NAT_RANGE_PROTO_SPECIFIED)
        redir = expression("redir", u32(NFTA_REDIR_REG_PROTO_MIN, NFT_REG_1), flags)
        self.exprs += [immediate, redir]

    def _match(self, op: Any, left: Any, right: Any) -> None:
        """`!`: none of the flags in right is set (libnftables: load, mask with them, equal to zero)."""
        if op != "!":
            return super()._match(op, left, right)
        f, mask = self._field(left)
        if mask is not None or f is not FIELDS["ct", "status"]:
            raise EncodeError(f"`!` on {left!r}")
        flags = f.encode(right)
        self.exprs += [load(f), bitwise(flags, bytes(f.size), False), cmp("==", bytes(f.size))]
        return None

    def _mangle(self, key: Any, value: Any) -> None:
        """`ct mark set`: to a constant, or to a chain of &, | and ^ over the mark; `meta mark` as the base
        class sets it."""
        if key != {"ct": {"key": "mark"}}:
            return super()._mangle(key, value)
        f, store = SETTABLE["ct mark"]
        if type(value) is int:
            self.exprs.append(expression("immediate", u32(1, NFT_REG_1), data_value(2, f.encode(value))))
        else:
            folded = _binops(value, key, (1 << (8 * f.size)) - 1) if isinstance(value, dict) else None
            if folded is None:
                raise EncodeError(f"unsupported ct mark value {value!r}")
            self.exprs += [load(f), bitwise(f.encode(folded[0]), f.encode(folded[1]))]
        self.exprs.append(store)
        return None

    def _anonymous(self, f: Field, values: list[Any]) -> AnonSet:
        if not f.dtype:
            raise EncodeError(f"an anonymous set of a key this encoder has no set type for: {values!r}")
        return super()._anonymous(f, values)
