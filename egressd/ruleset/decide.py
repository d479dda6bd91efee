"""The reference decision: which step of the semantics decides a packet to a destination.

A plain-Python twin of the rendered ruleset, used to explain verdicts and to check the kernel against: the
differential tests send real packets and compare what the kernel did with what this function says.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Collection, Container, Iterable
from dataclasses import dataclass

from egressd.model.config import Config
from egressd.model.entries import IPNetwork
from egressd.model.sandbox import Policy, Targets
from egressd.ruleset.names import matching_entry
from egressd.ruleset.render import EMBEDDED_IPV4

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Verdict:
    action: str  # "accept" or "deny"
    step: str  # embedded-ipv4, guard.deny, guard.allow, allow_out, deny_out, guard.private, internet
    entry: str | None = None  # the list entry that matched, when a list decided
    host: bool = False  # entry is a host name, and dst is among the addresses it resolved to
    via: str | None = None  # the name whose answer to the sandbox itself put dst in its learned sets

    def __str__(self) -> str:
        if self.via is not None:
            return f"{self.action}: {self.step} {self.entry} via {self.via}"
        if self.host:
            return f"{self.action}: {self.step} entry {self.entry}"
        if self.entry is not None:
            return f"{self.action}: {self.step} {self.entry}"
        if self.step == "internet":
            state = "true" if self.action == "accept" else "false"
            return f"{self.action}: allow_internet_access={state} and no list entry matches"
        return f"{self.action}: {self.step}"


def _first_match(addr: IPAddress, nets: Iterable[IPNetwork]) -> IPNetwork | None:
    for net in nets:
        if addr.version == net.version and addr in net:
            return net
    return None


def _targets(t: Targets) -> tuple[IPNetwork, ...]:
    return (*t.nets4, *t.nets6)


def _first_host(
    addr: IPAddress, names: Iterable[str], resolved: Callable[[str], Container[str]]
) -> str | None:
    """The first host name whose resolved addresses hold addr: the kernel's allow_dns/deny_dns sets."""
    text = str(addr)
    for name in names:
        if text in resolved(name):
            return name
    return None


def _no_addresses(name: str) -> Collection[str]:
    return ()


def decide(
    policy: Policy,
    config: Config,
    dst: str | IPAddress,
    resolved: Callable[[str], Container[str]] = _no_addresses,
    learned: Callable[[str], Collection[str]] = _no_addresses,
) -> Verdict:
    """The verdict for an original-direction packet from the sandbox to dst (not loopback, not ND).

    resolved(name) gives the addresses a host-name entry stands for right now (DnsCache.addresses: what the
    DNS sets hold); by default host names match nothing, as in a table whose names have not resolved yet.
    learned(address) gives the names whose answers to the sandbox itself put it in its learned sets (DNS
    interception), which accept right after the allow_out host names' sets.
    """
    addr = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped  # what a socket sends for it: an IPv4 packet
    elif isinstance(addr, ipaddress.IPv6Address) and addr in EMBEDDED_IPV4[1] and int(addr) > 1:
        return Verdict("deny", "embedded-ipv4", str(EMBEDDED_IPV4[1]))
    steps: list[tuple[str, Iterable[IPNetwork], str]] = [
        ("guard.deny", config.guard.deny, "deny"),
        ("guard.allow", config.guard.allow, "accept"),
        ("allow_out", _targets(policy.allow_out), "accept"),
        ("deny_out", _targets(policy.deny_out), "deny"),
        ("guard.private", config.guard.private, "deny"),
    ]
    hosts = {"allow_out": policy.allow_out.hostnames, "deny_out": policy.deny_out.hostnames}
    for step, nets, action in steps:
        hit = _first_match(addr, nets)
        if hit is not None:
            return Verdict(action, step, str(hit))
        # Each list's DNS sets come right after its CIDR sets (render.render).
        name = _first_host(addr, hosts.get(step, ()), resolved)
        if name is not None:
            return Verdict(action, step, name, host=True)
        if step == "allow_out":
            for via in sorted(learned(str(addr))):
                entry = matching_entry(policy.allow_out, via)
                if entry is not None:
                    return Verdict("accept", step, entry, host=True, via=via)
    return Verdict("accept" if policy.allow_internet_access else "deny", "internet")


def attribute(
    step: str,
    dst: str | IPAddress,
    policy: Policy,
    config: Config,
    resolved: Callable[[str], Container[str]] = _no_addresses,
) -> tuple[str | None, str | None]:
    """(the list entry, the host name) behind a denial the kernel logged under `step` (a log prefix,
    render.STEP_CHAINS): the first entry of that step's list holding dst, as decide() finds it, and the
    name dst stands for among the policy's host names (resolved as for decide), when one does. The step
    comes from the kernel, not from here: a DNS answer that changed since cannot move a denial to
    another step, at most leave its entry unknown."""
    addr = ipaddress.ip_address(dst) if isinstance(dst, str) else dst
    lists: dict[str, Iterable[IPNetwork]] = {
        "embedded-ipv4": EMBEDDED_IPV4,
        "guard.deny": config.guard.deny,
        "deny_out": _targets(policy.deny_out),
        "guard.private": config.guard.private,
    }
    hit = _first_match(addr, lists.get(step, ()))
    entry = str(hit) if hit is not None else None
    host = None
    if step == "deny_out" and entry is None:
        entry = host = _first_host(addr, policy.deny_out.hostnames, resolved)
    if host is None:
        host = _first_host(addr, (*policy.allow_out.hostnames, *policy.deny_out.hostnames), resolved)
    return entry, host
