"""The statements that are one expression each, both ways: `limit` and `log`, as libnftables 1.0.6 sends them
for a rule (nfnl_exprs.RuleEncoder, so both families: netdev and inet), and as the kernel dumps them back,
in the forms libnftables' JSON lists them (nfnl_listing.py).

What `nft -j -f` sends (strace; tests/integration/test_nfnl_batch.py and test_nfnl_sandbox.py compare):

- {"limit": {"rate": R, "per": P, "burst": B}}: NFTA_LIMIT_RATE (u64), _UNIT (u64, the seconds in P),
  _BURST (u32: 5 when B is absent or 0, as libnftables makes it), _TYPE (u32, NFT_LIMIT_PKTS) and _FLAGS
  (u32, 0), all big-endian, in that order. Only packets: "rate_unit" (libnftables' key) may say "packets";
  "unit", a key libnftables ignores, may too. Bytes, `over` (inv) and other periods raise EncodeError.
- {"log": {"prefix": S, "group": G, "snaplen": N, "queue-threshold": Q}}, each key optional:
  NFTA_LOG_PREFIX (S NUL-terminated, at most 127 bytes), then _GROUP (be16), _SNAPLEN (be32) and
  _QTHRESHOLD (be16), each only when given; nothing else (no level: the kernel's default, warn). snaplen
  and queue-threshold only with a group (libnftables drops them silently without one). {"log": null} is
  an expression with no attributes. Any other key raises EncodeError.

Read back, a limit of packets and a log of a level warn with no flags, or of a group, list as libnftables
lists them ({"limit": {"rate", "burst", "per"}}, with "inv": true for `over`; {"log": null} for a log with
nothing in it); any other form is left to the listing's generic decoding (its attributes in hex).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from egressd.kernel.nfnl import attr, each_attribute
from egressd.kernel.nfnl_values import EncodeError, expression, strz, u32

# linux/netfilter/nf_tables.h
NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST, NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS = 1, 2, 3, 4, 5
NFT_LIMIT_PKTS, NFT_LIMIT_F_INV = 0, 1
NFTA_LOG_GROUP, NFTA_LOG_PREFIX, NFTA_LOG_SNAPLEN, NFTA_LOG_QTHRESHOLD, NFTA_LOG_LEVEL = 1, 2, 3, 4, 5
LOG_WARNING = 4  # the level of a log with no group and no level given
NF_LOG_PREFIXLEN = 128  # with the NUL
PER = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
PER_NAMES = {seconds: name for name, seconds in PER.items()}
BURST_DEFAULT = 5  # what libnftables sends for a limit of packets with no burst, or burst 0
LIMIT_KEYS = ("rate", "per", "burst", "rate_unit", "unit")
LOG_KEYS = ("prefix", "group", "snaplen", "queue-threshold")


def _integer(value: Any, what: str, low: int, bits: int) -> int:
    if type(value) is not int or not low <= value < 1 << bits:
        raise EncodeError(f"{what} {value!r}: not an integer from {low} to {(1 << bits) - 1}")
    return value


def limit(arg: Any) -> bytes:
    if not isinstance(arg, dict) or not {"rate", "per"} <= set(arg) <= set(LIMIT_KEYS):
        raise EncodeError(f"unsupported limit {arg!r}")
    if any(arg.get(k, "packets") != "packets" for k in ("rate_unit", "unit")):
        raise EncodeError(f"a limit of anything but packets: {arg!r}")
    if not isinstance(arg["per"], str) or arg["per"] not in PER:
        raise EncodeError(f"a limit per {arg['per']!r} (not one of {', '.join(PER)})")
    rate = _integer(arg["rate"], "limit rate", 1, 64)
    burst = _integer(arg.get("burst", 0), "limit burst", 0, 32) or BURST_DEFAULT
    return expression(
        "limit",
        attr(NFTA_LIMIT_RATE, struct.pack("!Q", rate)),
        attr(NFTA_LIMIT_UNIT, struct.pack("!Q", PER[arg["per"]])),
        u32(NFTA_LIMIT_BURST, burst),
        u32(NFTA_LIMIT_TYPE, NFT_LIMIT_PKTS),
        u32(NFTA_LIMIT_FLAGS, 0),
    )


def log(arg: Any) -> bytes:
    arg = {} if arg is None else arg
    if not isinstance(arg, dict) or not set(arg) <= set(LOG_KEYS):
        raise EncodeError(f"unsupported log {arg!r}")
    if "group" not in arg and ("snaplen" in arg or "queue-threshold" in arg):
        raise EncodeError(f"a log's snaplen or queue-threshold without a group: {arg!r}")
    out = []
    if "prefix" in arg:
        prefix = arg["prefix"]
        ok = isinstance(prefix, str) and "\0" not in prefix
        try:
            ok = ok and len(prefix.encode()) < NF_LOG_PREFIXLEN
        except UnicodeEncodeError:
            ok = False
        if not ok:
            raise EncodeError(f"log prefix {prefix!r}: not a string of at most {NF_LOG_PREFIXLEN - 1} bytes")
        out.append(strz(NFTA_LOG_PREFIX, prefix))
    if "group" in arg:
        out.append(attr(NFTA_LOG_GROUP, struct.pack("!H", _integer(arg["group"], "log group", 0, 16))))
    if "snaplen" in arg:
        out.append(u32(NFTA_LOG_SNAPLEN, _integer(arg["snaplen"], "log snaplen", 0, 32)))
    if "queue-threshold" in arg:
        q = _integer(arg["queue-threshold"], "log queue-threshold", 0, 16)
        out.append(attr(NFTA_LOG_QTHRESHOLD, struct.pack("!H", q)))
    return expression("log", *out)


STATEMENTS: dict[str, Callable[[Any], bytes]] = {"limit": limit, "log": log}


def _listed_limit(a: dict[int, bytes]) -> Any:
    if set(a) != {NFTA_LIMIT_RATE, NFTA_LIMIT_UNIT, NFTA_LIMIT_BURST, NFTA_LIMIT_TYPE, NFTA_LIMIT_FLAGS}:
        return None
    (rate,), (unit,) = struct.unpack("!Q", a[NFTA_LIMIT_RATE]), struct.unpack("!Q", a[NFTA_LIMIT_UNIT])
    (burst,), (kind,) = struct.unpack("!I", a[NFTA_LIMIT_BURST]), struct.unpack("!I", a[NFTA_LIMIT_TYPE])
    (flags,) = struct.unpack("!I", a[NFTA_LIMIT_FLAGS])
    if kind != NFT_LIMIT_PKTS or unit not in PER_NAMES or flags & ~NFT_LIMIT_F_INV:
        return None
    out = {"rate": rate, "burst": burst, "per": PER_NAMES[unit]}
    return {"limit": out | ({"inv": True} if flags else {})}


def _listed_log(a: dict[int, bytes]) -> Any:
    out: dict[str, Any] = {}
    if NFTA_LOG_PREFIX in a:
        out["prefix"] = a[NFTA_LOG_PREFIX].split(b"\0", 1)[0].decode()  # not UTF-8: ValueError
    if NFTA_LOG_GROUP in a:  # a log to a netlink group (ULOG): what was sent comes back
        if not set(a) <= {NFTA_LOG_PREFIX, NFTA_LOG_GROUP, NFTA_LOG_SNAPLEN, NFTA_LOG_QTHRESHOLD}:
            return None
        (out["group"],) = struct.unpack("!H", a[NFTA_LOG_GROUP])
        if NFTA_LOG_SNAPLEN in a:
            (out["snaplen"],) = struct.unpack("!I", a[NFTA_LOG_SNAPLEN])
        if NFTA_LOG_QTHRESHOLD in a:  # the kernel leaves out 0, as libnftables does
            (out["queue-threshold"],) = struct.unpack("!H", a[NFTA_LOG_QTHRESHOLD])
        return {"log": out}
    if not set(a) <= {NFTA_LOG_PREFIX, NFTA_LOG_LEVEL}:  # flags, or another kind of attribute
        return None
    if NFTA_LOG_LEVEL in a and struct.unpack("!I", a[NFTA_LOG_LEVEL]) != (LOG_WARNING,):
        return None
    return {"log": out or None}


LISTED: dict[str, Callable[[dict[int, bytes]], Any]] = {"limit": _listed_limit, "log": _listed_log}


def listed(name: str, data: memoryview) -> Any:
    """An expression's data (NFTA_EXPR_DATA) as libnftables lists its statement, if it is a limit or a log
    of the forms this module knows; None otherwise (and for anything malformed)."""
    decode = LISTED.get(name)
    if decode is None:
        return None
    try:
        return decode({kind: bytes(value) for kind, value in each_attribute(data) if len(value)})
    except (ValueError, struct.error):  # UnicodeDecodeError included
        return None
