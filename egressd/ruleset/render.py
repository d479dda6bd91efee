"""Pure rendering: a policy plus the operator's config in, libnftables JSON commands out.

No I/O and no kernel here, so every ruleset can be checked by golden files. The table's shape is static
(named chains, per-family interval sets): a change rewrites one table, never edits single rules.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from egressd.model.config import Config, Denials
from egressd.model.entries import IPNetwork, within
from egressd.model.sandbox import Policy
from egressd.ruleset.dnsrules import LEARNED_SETS, dns_l4, intercept_hooks, intercepting
from egressd.ruleset.exprs import (
    ACCEPT,
    DENY,
    Json,
    T,
    match,
    match_daddr,
    meta,
    payload,
    rule,
)
from egressd.ruleset.generation import ADMIT, Marks, generation

SCHEMA = "egressd/2"  # 2: the DNS interception chains and learned sets in every table
FINGERPRINT_CHAIN = "fingerprint"
VARIANTS = ("a", "b")
VARIANT_SUFFIXES = ("_a", "_b")

# The deny steps, and the chain each goes through to log what it denies (docs/denials.md): the log prefix
# names the step, as `explain` does.
STEP_CHAINS = {
    "dns": "log_dns",  # a query around DNS interception
    "embedded-ipv4": "log_embedded",
    "guard.deny": "log_guard_deny",
    "deny_out": "log_deny_out",
    "guard.private": "log_private",
    "internet": "log_internet",
}
# ICMPv6 neighbour and router discovery: without these the sandbox cannot reach even its gateway over IPv6.
ND_TYPES = ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]
# Multicast listener reports for link-local groups: a snooping bridge needs them to deliver neighbour
# solicitations to the sandbox. Hop limit 1 and ff02::/16 keep them on the link.
# IPv4-mapped (::ffff:a.b.c.d) and IPv4-compatible (::a.b.c.d) IPv6 destinations. A socket sends the
# former as IPv4 (judged by the IPv4 rules); as IPv6 packets they are only ever a way around those rules.
EMBEDDED_IPV4 = (ipaddress.IPv6Network("::ffff:0:0/96"), ipaddress.IPv6Network("::/96"))
MLD_TYPES = ["mld-listener-report", "mld-listener-done", "mld2-listener-report"]


@dataclass(frozen=True)
class Ruleset:
    """One policy's table, in parts, with neutral names (decide, allow4, ...).

    An update never creates a set in the same transaction as the rules that read it (the kernel can show
    such a set empty for an instant after the rules take effect). So the per-policy objects exist in two
    variants, decide_a/allow4_a and decide_b/allow4_b: a new policy is staged in the unused variant in one
    transaction, and the hooks are switched to it in a second. See ruleset/variants.py and
    ruleset/transactions.py.
    """

    variant: list[Json]  # sets, deny and decide chains and their rules
    hooks: list[Json]  # the rules of the output and forward base chains, which jump to decide
    fingerprint: str
    dns_sets: tuple[str, ...] = ()  # sets whose elements come from DNS (see elements_for)
    names: frozenset[str] = frozenset()  # the per-variant objects
    # The table without its set elements: every policy of one shape (the same sets, rules and config, other
    # addresses) lists the same way but for the elements, so one read of the kernel's listing per shape
    # teaches the reconciler what all of them look like (see reconcile.listing_digest).
    shape: str = ""
    chains: frozenset[str] = frozenset()  # the per-variant objects that are chains (the rest are sets)
    intercept: bool = False  # the sandbox's DNS queries are answered by egressd, which fills LEARNED_SETS
    generation: int = 0  # in the conntrack mark of the connections it accepts (generation.py); 0: none

    def elements(self) -> dict[str, list[Any]]:
        """The elements of each address set, by neutral name (the DNS sets are rendered empty)."""
        return {
            c["add"]["set"]["name"]: c["add"]["set"].get("elem", [])
            for c in self.variant
            if "set" in c.get("add", {})
        }


def _elem(net: IPNetwork) -> Any:
    # inet_ntop is ~8x faster than str() on IPv6 addresses, which matters at 10,000 entries.
    addr = socket.inet_ntop(
        socket.AF_INET if net.version == 4 else socket.AF_INET6, net.network_address.packed
    )
    if net.prefixlen == net.max_prefixlen:
        return addr
    return {"prefix": {"addr": addr, "len": net.prefixlen}}


def _split(nets: Iterable[IPNetwork]) -> tuple[list[IPNetwork], list[IPNetwork]]:
    """Callers pass networks already merged (entries.collapse), so splitting by family is all that is left."""
    v4: list[IPNetwork] = []
    v6: list[IPNetwork] = []
    for n in nets:
        (v4 if n.version == 4 else v6).append(n)
    return v4, v6


class _Builder:
    """Collects sets first and rules after, so every set and chain exists before anything refers to it."""

    def __init__(self, marks: Marks | None, denials: Denials | None) -> None:
        self.sets: list[Json] = []
        self.rules: list[Json] = []
        # How a destination step accepts: marking the connection with the generation where there is one.
        self.accept: tuple[Json, ...] = marks.accept if marks is not None else (ACCEPT,)
        self._denials = denials

    def deny(self, step: str) -> tuple[Json, ...]:
        """How a step denies: through its logging chain when denials are logged, else straight to `deny`."""
        if self._denials is None:
            return (DENY,)
        return ({"jump": {"target": STEP_CHAINS[step]}},)

    def step_chains(self) -> list[Json]:
        """One chain per deny step used: log the packet (within the kernel's rate limit), then deny. The
        limit only ever skips the log: the packet goes on to `deny` either way. Only the steps a rule
        jumps to (an empty list has no rule)."""
        d = self._denials
        used = {e["jump"]["target"] for r in self.rules for e in r["add"]["rule"]["expr"] if "jump" in e}
        out: list[Json] = []
        for step, chain in STEP_CHAINS.items() if d is not None else ():
            if chain not in used:
                continue
            limit = {"limit": {"rate": d.rate, "burst": d.burst, "per": "second"}}
            out.append({"add": {"chain": {**T, "name": chain}}})
            out.append(rule(chain, limit, {"log": {"prefix": step, "group": d.group}}))
            out.append(rule(chain, DENY))
        return out

    def set_rules(
        self, name: str, nets: Iterable[IPNetwork], verdict: tuple[Json, ...], extra: Iterable[Json] = ()
    ) -> None:
        """One interval set per family, and one rule per non-empty set; empty lists cost no rule."""
        for version, members in zip((4, 6), _split(nets), strict=True):
            if not members:
                continue
            set_name = f"{name}{version}"
            self.sets.append(
                {
                    "add": {
                        "set": {
                            **T,
                            "name": set_name,
                            "type": "ipv4_addr" if version == 4 else "ipv6_addr",
                            "flags": ["interval"],
                            "elem": [_elem(n) for n in members],
                        }
                    }
                }
            )
            self.rules.append(rule("decide", match_daddr(version, set_name), *extra, *verdict))

    def dns_sets(self, name: str, verdict: tuple[Json, ...]) -> list[str]:
        """Plain sets (no intervals) for resolved addresses, both families, rendered empty: their elements
        change with DNS, by difference, and are not part of the fingerprint."""
        names = []
        for version in (4, 6):
            set_name = f"{name}{version}"
            set_type = "ipv4_addr" if version == 4 else "ipv6_addr"
            self.sets.append({"add": {"set": {**T, "name": set_name, "type": set_type}}})
            self.rules.append(rule("decide", match_daddr(version, set_name), *verdict))
            names.append(set_name)
        return names


def _deny_chain(action: str, host_mark: int | None = None) -> list[Json]:
    rules = [rule("deny", {"counter": "denied"})]
    if host_mark is not None:
        # The host side runs before conntrack (see hostside.py): it marks, and the guard table drops what is
        # marked unless conntrack calls it a reply.
        mark = {"meta": {"key": "mark"}}
        rules.append(rule("deny", {"mangle": {"key": mark, "value": {"|": [mark, host_mark]}}}, ACCEPT))
        return rules
    if action == "drop":
        rules.append(rule("deny", {"drop": None}))
    else:
        rules.append(rule("deny", match(meta("l4proto"), "tcp"), {"reject": {"type": "tcp reset"}}))
        rules.append(rule("deny", {"reject": {"type": "icmpx", "expr": "admin-prohibited"}}))
    return rules


def render(policy: Policy, config: Config, host: bool = False) -> Ruleset:
    """The whole `inet egressd` table for one sandbox. Order of `decide` is the documented semantics.

    host=True: the same decision for the sandbox's host-side table (see hostside.py), which sees its packets
    as they arrive from its link, at the ingress hook, before conntrack: no loopback there, and no reply
    step (a deny only marks the packet; the guard table drops it unless conntrack calls it a reply). Neighbour
    discovery passes only towards the link itself (link-local or multicast destinations); to any other
    address the guard table lets it through only to this host's own addresses, which closes the
    neighbour-solicitation channel the sandbox's own table has to leave open.
    """
    intercept = intercepting(policy, config)
    # Every accept marks the connection with the policy's generation, and a connection of the current
    # generation is let through first (generation.py). Not on the host side: its hook runs before conntrack.
    marks = None if host else Marks(config.intercept.conn_mark_mask)
    variant, hooks, dns_sets, names, chains = _build(policy, config, host, intercept, marks)
    digest, shape = _digests(variant, hooks, "host" if host else config.uplink)
    value = 0
    if marks is not None:
        # Rendered with generation 0, so the shape is every generation's; the generation comes from that
        # table's digest, and the fingerprint covers both (one table, one fingerprint).
        value = generation(digest, policy.allow_out.names, config.intercept.conn_mark_mask)
        marks.set(value)
        digest = hashlib.sha256(f"{digest} {value:#x}".encode()).hexdigest()
    fingerprint = f"{SCHEMA} sha256:{digest}"
    return Ruleset(variant, hooks, fingerprint, tuple(dns_sets), names, shape, chains, intercept, value)


def _build(
    policy: Policy, config: Config, host: bool, intercept: bool, marks: Marks | None
) -> tuple[list[Json], list[Json], list[str], frozenset[str], frozenset[str]]:
    """The variant, the hooks, the DNS set names, the per-variant names and which of them are chains.
    The host side logs nothing itself: its deny only marks, and a reply is told apart only later."""
    b = _Builder(marks, config.denials if config.denials.log and not host else None)
    _link_rules(b, host, config.intercept.port if intercept else None)
    dns_sets = _destination_rules(b, policy, config, intercept)
    # 7. everything else: the public internet.
    internet = b.accept if policy.allow_internet_access else b.deny("internet")
    b.rules.append(rule("decide", *internet))
    steps = b.step_chains()

    variant: list[Json] = [
        *b.sets,
        {"add": {"chain": {**T, "name": "deny"}}},
        *(marks.admit() if marks is not None else []),
        {"add": {"chain": {**T, "name": "decide"}}},
        *_deny_chain(config.deny_action, config.host_mark if host else None),
        *steps,
        *b.rules,
    ]
    hooks = _hooks(config, marks) + (intercept_hooks(config) if intercept and not host else [])
    chains = frozenset(["deny", "decide", *(c["add"]["chain"]["name"] for c in steps if "chain" in c["add"])])
    chains |= {ADMIT} if marks else set()
    names = chains | {c["add"]["set"]["name"] for c in b.sets}  # what exists twice in an update: _a, _b
    return variant, hooks, dns_sets, names, chains


def _link_rules(b: _Builder, host: bool, proxy_port: int | None = None) -> None:
    """Step 1 of `decide`: loopback, replies on connections opened from outside, IPv6 neighbour discovery;
    with interception, the redirected DNS queries (the output filter still sees the original device)."""
    if proxy_port is not None and host:
        # The sandbox's own table sends every query to its proxy: port 53 on the wire is a packet socket
        # going around it (CAP_NET_RAW), a channel out of the host.
        b.rules.append(rule("decide", *dns_l4(53), *b.deny("dns")))
    elif proxy_port is not None:
        for version, local in ((4, "127.0.0.1"), (6, "::1")):
            daddr = payload("ip" if version == 4 else "ip6", "daddr")
            b.rules.append(rule("decide", match(daddr, local), *dns_l4(proxy_port), ACCEPT))
    icmpv6_type = payload("icmpv6", "type")
    hoplimit = payload("ip6", "hoplimit")
    nd = (match(icmpv6_type, {"set": ND_TYPES}), match(hoplimit, 255))
    if host:
        on_link = {
            "set": [{"prefix": {"addr": "fe80::", "len": 10}}, {"prefix": {"addr": "ff02::", "len": 16}}]
        }
        b.rules.append(rule("decide", *nd, match(payload("ip6", "daddr"), on_link), ACCEPT))
    else:
        b.rules.append(rule("decide", match(meta("oifname"), "lo"), ACCEPT))
        b.rules.append(rule("decide", match({"ct": {"key": "direction"}}, "reply"), ACCEPT))
        b.rules.append(rule("decide", *nd, ACCEPT))
    link_multicast = match(payload("ip6", "daddr"), {"prefix": {"addr": "ff02::", "len": 16}})
    b.rules.append(
        rule("decide", match(icmpv6_type, {"set": MLD_TYPES}), match(hoplimit, 1), link_multicast, ACCEPT)
    )
    if proxy_port is not None and not host:
        # Every query was redirected to the proxy's port before this chain sees it: what still goes to port 53
        # is a flow conntrack had set up before the redirect was in force (NAT is decided once per flow).
        b.rules.append(rule("decide", *dns_l4(53), *b.deny("dns")))


def _destination_rules(b: _Builder, policy: Policy, config: Config, intercept: bool = False) -> list[str]:
    """Steps 2-6 of `decide`, by destination; returns the names of the DNS sets, in table order."""
    # 2-6. operator deny, operator allow, tenant allow, tenant deny, private ranges. IPv6 destinations that
    # embed an IPv4 address go first: on the wire they would slip past every IPv4 rule (to a translator).
    b.set_rules("embedded", EMBEDDED_IPV4, b.deny("embedded-ipv4"))
    b.set_rules("guard_deny", config.guard.deny, b.deny("guard.deny"))
    closed_names = not policy.allow_internet_access and policy.allow_out.hostnames
    if closed_names and config.sandbox_resolvers and not intercept:
        # A closed sandbox that names hosts needs DNS to use them: port 53 of the operator's resolvers only.
        dns_port = [match(meta("l4proto"), {"set": ["tcp", "udp"]}), match(payload("th", "dport"), 53)]
        b.set_rules("resolvers", config.sandbox_resolvers, b.accept, extra=dns_port)
    b.set_rules("guard_allow", config.guard.allow, b.accept)
    b.set_rules("allow", (*policy.allow_out.nets4, *policy.allow_out.nets6), b.accept)
    dns_sets = b.dns_sets("allow_dns", b.accept) if policy.allow_out.hostnames else []
    if intercept and policy.allow_out.names:
        for version, name in zip((4, 6), LEARNED_SETS, strict=True):
            b.rules.append(rule("decide", match_daddr(version, name), *b.accept))
    b.set_rules("deny", (*policy.deny_out.nets4, *policy.deny_out.nets6), b.deny("deny_out"))
    if policy.deny_out.hostnames:
        dns_sets += b.dns_sets("deny_dns", b.deny("deny_out"))
    b.set_rules("private", config.guard.private, b.deny("guard.private"))
    return dns_sets


def _hooks(config: Config, marks: Marks | None) -> list[Json]:
    """The base chains' rules, which jump to `decide`: ingress on the host side (no marks), else output and
    forward, where a connection already judged under this policy (its generation) is let through first."""
    decide = {"jump": {"target": "decide"}}
    if marks is None:
        return [rule("ingress", decide)]
    uplink = match(meta("iifname"), config.uplink)
    return [
        rule("output", *marks.carried),
        rule("output", decide),
        # Forwarded traffic (a microVM behind a tap) is judged unless it enters from the uplink: that is
        # traffic towards the sandbox, not from it.
        rule("forward", uplink, ACCEPT),
        rule("forward", *marks.carried),
        rule("forward", decide),
    ]


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


GIL_HELD_BYTES = 2047  # hashlib gives the GIL up while it hashes 2,048 bytes or more at once


def _sha256(parts: Iterable[str]) -> str:
    """The sha256 of the parts joined, fed in pieces too short for hashlib to give the GIL up. Rendering runs
    on the event loop: giving the GIL up for the microseconds a table's text takes to hash made the loop
    wait for it behind the workers, up to the interpreter's switch interval (5 ms), twice per table."""
    h = hashlib.sha256()
    for part in parts:
        data = memoryview(part.encode())
        for i in range(0, len(data), GIL_HELD_BYTES):
            h.update(data[i : i + GIL_HELD_BYTES])
    return h.hexdigest()


def _digests(variant: list[Json], hooks: list[Json], where: str) -> tuple[str, str]:
    """Digests of the whole table and of its shape (the table without its set elements, see Ruleset): the
    sha256 of the canonical JSON of [variant, hooks, where], and of the same with the sets bare. Each
    command is serialised once and the two texts are joined from the pieces (the JSON of a list is its
    items' joined by commas), so only a set with elements is serialised twice, without them the second time.
    Byte for byte the text json.dumps gives for the whole list (tests/unit/test_render.py)."""
    full, bare = [], []
    for c in variant:
        text = _canonical(c)
        full.append(text)
        if "set" in c["add"] and "elem" in c["add"]["set"]:
            text = _canonical({"add": {"set": {k: v for k, v in c["add"]["set"].items() if k != "elem"}}})
        bare.append(text)
    tail = "]," + _canonical(hooks) + "," + _canonical(where) + "]"
    digest = _sha256(("[[", ",".join(full), tail))
    shape = _sha256(("[[", ",".join(bare), tail))
    return digest, shape


def elements_for(
    ruleset: Ruleset, allow: Iterable[str], deny: Iterable[str], guard_deny: Iterable[IPNetwork]
) -> dict[str, frozenset[str]]:
    """Resolved addresses as set elements. An allowed name never lets through an address inside
    guard.deny (DNS rebinding to the metadata address): those are left out."""
    blocked = tuple(guard_deny)

    def split(addrs: Iterable[str], drop_guarded: bool) -> tuple[frozenset[str], frozenset[str]]:
        v4, v6 = set(), set()
        for a in addrs:
            ip = ipaddress.ip_address(a)
            if drop_guarded and within(ip, blocked):
                continue
            (v4 if ip.version == 4 else v6).add(str(ip))
        return frozenset(v4), frozenset(v6)

    out: dict[str, frozenset[str]] = {}
    for prefix, addrs, guarded in (("allow_dns", allow, True), ("deny_dns", deny, False)):
        if f"{prefix}4" in ruleset.dns_sets:
            out[f"{prefix}4"], out[f"{prefix}6"] = split(addrs, guarded)
    return out
