"""One allow_out/deny_out entry: an address, a CIDR, a host name or a host-name pattern (*.example.com),
parsed and normalised.

The one place that reads destination text, with messages that say what to write instead: the sandbox record
(model/sandbox.py) parses its lists here, the config (model/config.py) merges its guard ranges with
`collapse`, and `explain` reads the destination it is asked about.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Iterable
from typing import Any

import idna
from publicsuffixlist import PublicSuffixList

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Dotted quads without leading zeros, or IPv6 in hex and colons only; an optional prefix of 1-3 digits.
_FAST_NET_RE = re.compile(
    r"^((?:(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])\.){3}(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
    r"|[0-9A-Fa-f:]{2,39})(?:/([0-9]{1,3}))?$"
)
_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
PATTERN_PREFIX = "*."
# The ICANN section only: names in the private section (githubusercontent.com, github.io) are each run by
# one operator, and a pattern below them (*.githubusercontent.com) is what users of every peer ask for.
_SUFFIXES = PublicSuffixList(only_icann=True)


def within(addr: ipaddress.IPv4Address | ipaddress.IPv6Address | str, nets: Iterable[IPNetwork]) -> bool:
    """Whether an address lies in any of the networks (of its own family)."""
    ip = ipaddress.ip_address(addr) if isinstance(addr, str) else addr
    return any(ip.version == n.version and ip in n for n in nets)


def collapse(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    """Merge overlapping and adjacent networks, sorted, IPv4 first; fast when little merges.

    ipaddress.collapse_addresses costs ~60 ms for 10,000 entries; this merges integer intervals per family
    and only summarises a range where networks really merged.
    """
    out: list[IPNetwork] = []
    by_family: dict[int, list[IPNetwork]] = {4: [], 6: []}
    for n in nets:
        by_family[n.version].append(n)
    for members in by_family.values():
        spans = sorted(
            ((int(n.network_address), int(n.broadcast_address), n) for n in members),
            key=lambda s: (s[0], -s[1]),
        )
        i = 0
        while i < len(spans):
            _, end, net = spans[i]
            j = i + 1
            merged = False
            while j < len(spans) and spans[j][0] <= end + 1:
                merged = merged or spans[j][1] > end
                end = max(end, spans[j][1])
                j += 1
            if merged:
                last = type(net.network_address)(end)
                out.extend(ipaddress.summarize_address_range(net.network_address, last))  # type: ignore[arg-type]
            else:
                out.append(net)
            i = j
    return tuple(out)


def _normalise_mapped(net: IPNetwork) -> IPNetwork:
    """An IPv4-mapped IPv6 entry means the IPv4 destination: the kernel sends such traffic as IPv4."""
    if isinstance(net, ipaddress.IPv6Network) and net.subnet_of(_IPV4_MAPPED):
        v4 = ipaddress.IPv4Address(int(net.network_address) & 0xFFFFFFFF)
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


def fast_network(text: str) -> IPNetwork | None:
    """The common, well-formed entry parsed with inet_pton and integers: 5-15x faster than ipaddress parsing
    the text, which was most of validating a record (and a restart validates every record). Only shapes on
    which inet_pton and ipaddress agree take this path; None sends everything else to the careful parser."""
    m = _FAST_NET_RE.match(text)
    if m is None:
        return None
    addr_part, prefix_part = m.group(1), m.group(2)
    v6 = ":" in addr_part
    try:
        packed = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, addr_part)
    except OSError:
        return None
    bits = 128 if v6 else 32
    length = bits if prefix_part is None else int(prefix_part)
    if length > bits:
        return None
    value = int.from_bytes(packed, "big")
    if v6:
        if length >= 96 and value >> 32 == 0xFFFF:  # IPv4-mapped: see _normalise_mapped
            return None
        return ipaddress.IPv6Network((value, length), strict=False)
    return ipaddress.IPv4Network((value, length), strict=False)


def parse_network(text: str) -> IPNetwork:
    """Parse an address or CIDR; raises ValueError with a message written for the operator."""
    fast = fast_network(text)
    return fast if fast is not None else parse_network_carefully(text)


def parse_network_carefully(text: str) -> IPNetwork:
    """parse_network without the fast path: ipaddress parses the text, and every refusal is explained."""
    addr_part, _, prefix_part = text.partition("/")
    if "%" in addr_part:
        raise ValueError("scoped IPv6 addresses (with %zone) are not supported; give the address alone")
    try:
        addr = ipaddress.ip_address(addr_part)
    except ValueError:
        if ":" in addr_part:
            raise ValueError("not a valid IPv6 address; write it like 2001:db8::1 or 2001:db8::/32") from None
        if addr_part.count(".") == 3 and all(p.isdigit() for p in addr_part.split(".")):
            if any(len(p) > 1 and p.startswith("0") for p in addr_part.split(".")):
                raise ValueError("leading zeros in an IPv4 address are ambiguous; write 10.1.2.3") from None
            raise ValueError("not a valid IPv4 address: each part must be 0-255") from None
        raise ValueError(
            "not a valid IPv4 address (an all-numeric name is not a hostname); write it like 198.51.100.7"
        ) from None
    if not prefix_part:
        return _normalise_mapped(ipaddress.ip_network(addr))
    if not prefix_part.isdigit() or len(prefix_part) > 3:
        raise ValueError("the prefix length after '/' must be a number, e.g. 198.51.100.0/24")
    length = int(prefix_part)
    if length > addr.max_prefixlen:
        raise ValueError(
            f"prefix length {length} is too long for IPv{addr.version} (at most {addr.max_prefixlen})"
        )
    return _normalise_mapped(ipaddress.ip_network((addr, length), strict=False))


def normalise_hostname(text: str) -> str:
    """RFC 1123 host name, lower case, no trailing dot; internationalised names become their A-label form."""
    name = text[:-1] if text.endswith(".") else text
    if not name:
        raise ValueError("empty host name")
    if not name.isascii():
        try:
            name = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise ValueError(f"not a valid internationalised host name ({e})") from None
    name = name.lower()
    if len(name) > 253:
        raise ValueError(f"host name is {len(name)} characters long; the limit is 253")
    labels = name.split(".")
    for label in labels:
        if not label:
            raise ValueError("host name has an empty label (two dots in a row, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"label {label[:20]!r}... is {len(label)} characters long; the limit is 63")
        if not _LABEL_RE.match(label):
            raise ValueError(
                f"label {label!r} may hold only letters, digits and inner hyphens (RFC 1123 host name)"
            )
    if labels[-1].isdigit():
        raise ValueError(
            "an all-numeric top-level label is not a host name; is this a mistyped IPv4 address?"
        )
    return name


def parse_pattern(text: str) -> str:
    """*.example.com: every name below example.com, at any depth, never example.com itself."""
    if not text.startswith(PATTERN_PREFIX) or "*" in text[len(PATTERN_PREFIX) :]:
        raise ValueError(
            "a wildcard may only be the whole leftmost label, as in *.example.com (which matches every name "
            "below example.com, at any depth)"
        )
    rest = normalise_hostname(text[len(PATTERN_PREFIX) :])
    if _SUFFIXES.is_public(rest):
        raise ValueError(
            f"*.{rest} would match every name under the public suffix {rest}; name a domain below it, "
            f"e.g. *.example.{rest}"
        )
    return PATTERN_PREFIX + rest


def is_pattern(entry: str) -> bool:
    return entry.startswith(PATTERN_PREFIX)


def pattern_matches(pattern: str, name: str) -> bool:
    """Whether a normalised name falls under a pattern: strictly below its domain."""
    return name.endswith(pattern[1:])  # ".example.com": a name below it, never the domain itself


def parse_entry(value: Any) -> IPNetwork | str:
    """One allow_out/deny_out entry: an address or CIDR (as a network), or a host name or pattern (as a
    string)."""
    if not isinstance(value, str):
        raise ValueError(f"must be a string (an address, CIDR or host name), not {type(value).__name__}")
    text = value.strip()
    if not text:
        raise ValueError("empty entry; remove it or give an address, CIDR or host name")
    if "://" in text:
        raise ValueError("looks like a URL; give only the host name or address, e.g. example.com")
    if "*" in text:
        return parse_pattern(text)
    if text.startswith("[") or (text.count(":") == 1 and "/" not in text):
        raise ValueError("looks like host:port; ports are not supported, give only the host name or address")
    if any(c.isspace() for c in text):
        raise ValueError("contains whitespace; give one address, CIDR or host name per entry")
    if "/" in text or ":" in text or re.fullmatch(r"[0-9.]+", text):
        return parse_network(text)
    return normalise_hostname(text)
