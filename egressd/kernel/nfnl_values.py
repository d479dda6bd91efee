"""The values nf_tables messages are made of, for nfnl_exprs.py and nfnl_encode.py: attributes, data,
verdicts, expressions' frames, set userdata, addresses, set elements and the intervals of an interval set,
as libnftables 1.0.6 (with libnftnl) sends them. Anything it cannot encode raises EncodeError.

Interval elements are built in bulk (a table may hold 10,000 addresses): an element with nothing but its key
is one concatenation of a constant head and the key.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from typing import Any

from egressd.kernel.nfnl import NLA_F_NESTED, NLATTR, attr, nested

NFTA_LIST_ELEM, NFTA_EXPR_NAME, NFTA_EXPR_DATA = 1, 1, 2
NFTA_DATA_VALUE, NFTA_DATA_VERDICT, NFTA_VERDICT_CODE, NFTA_VERDICT_CHAIN = 1, 2, 1, 2
NFTA_SET_ELEM_KEY, NFTA_SET_ELEM_FLAGS, NFTA_SET_ELEM_TIMEOUT, NFTA_SET_ELEM_USERDATA = 1, 3, 4, 6
NFT_SET_ELEM_INTERVAL_END = 1
# nftables' set userdata (libnftnl udata.h): key byte order, merge flag, the key's `typeof` expression
UDATA_KEYBYTEORDER, UDATA_MERGE_ELEMENTS, UDATA_KEY_TYPEOF = 0, 2, 3
UDATA_ELEM_FLAGS, ELEM_F_INTERVAL_OPEN = 1, 1


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


def named(size: int, names: dict[str, int], order: str = "!") -> Callable[[Any], bytes]:
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
    family = socket.AF_INET if version == 4 else socket.AF_INET6  # inet_pton: 8x faster than ipaddress

    def encode(value: Any) -> bytes:
        try:
            return socket.inet_pton(family, value)
        except (OSError, TypeError):
            raise EncodeError(f"{value!r} is not an IPv{version} address") from None

    return encode


def address_range(value: Any, version: int) -> tuple[int, int]:
    """An address, {"prefix": {"addr", "len"}} or {"range": [low, high]} as the first and last address."""
    number, bits = address(version), 32 if version == 4 else 128
    try:
        if isinstance(value, str):  # libnftables JSON writes a prefix as "prefix"
            return (low := int.from_bytes(number(value), "big")), low
        if isinstance(value, dict) and set(value) == {"prefix"} and set(value["prefix"]) == {"addr", "len"}:
            low, length = int.from_bytes(number(value["prefix"]["addr"]), "big"), value["prefix"]["len"]
            host = (1 << (bits - length)) - 1 if type(length) is int and 0 <= length <= bits else -1
            if host >= 0 and not low & host:
                return low, low | host
        if isinstance(value, dict) and set(value) == {"range"} and len(value["range"]) == 2:
            low, high = (int.from_bytes(number(v), "big") for v in value["range"])
            if low <= high:
                return low, high
    except (TypeError, ValueError):  # EncodeError included
        pass
    raise EncodeError(f"{value!r} is not an IPv{version} address, prefix or range")


def _heads(flags: int) -> dict[int, bytes]:
    """What precedes a 4- or 16-byte key in an element with these flags (0: none) and nothing else."""
    heads = {}
    for n in (4, 16):
        value = NLATTR.pack(4 + n, NFTA_DATA_VALUE)
        key = NLATTR.pack(8 + n, NFTA_SET_ELEM_KEY | NLA_F_NESTED)
        body = (u32(NFTA_SET_ELEM_FLAGS, flags) if flags else b"") + key
        heads[n] = NLATTR.pack(4 + len(body) + len(value) + n, NFTA_LIST_ELEM | NLA_F_NESTED) + body + value
    return heads


ELEMENT_HEADS = {0: _heads(0), NFT_SET_ELEM_INTERVAL_END: _heads(NFT_SET_ELEM_INTERVAL_END)}


def element(key: bytes, flags: int = 0, timeout_ms: int | None = None, open_end: bool = False) -> bytes:
    head = ELEMENT_HEADS.get(flags, {}).get(len(key)) if timeout_ms is None and not open_end else None
    if head is not None:  # the common case, 10,000 times for a large set: one concatenation
        return head + key
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
