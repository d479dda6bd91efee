"""`egressd explain`: why a sandbox can or cannot reach a destination, in the agent's own terms.

Every verdict comes from decide.decide, the function the differential tests check against the kernel, fed
with what the kernel is given: the enforced policy (held closed as plan() holds it) and the DNS cache's
addresses. This module only chooses the inputs and words the answer.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from typing import Any

from egressd.desired.dnscache import DnsCache
from egressd.model.config import Config
from egressd.model.entries import parse_entry, within
from egressd.model.sandbox import Policy
from egressd.ruleset.decide import IPAddress, Verdict, decide
from egressd.ruleset.plan import enforced_policy


def parse_dest(text: str) -> IPAddress | str:
    """One address (as an address) or one host name (normalised); anything else is a ValueError that says
    what to write instead."""
    try:
        return ipaddress.ip_address(text.strip())
    except ValueError:
        pass
    entry = parse_entry(text)  # its errors already say what to write instead
    if isinstance(entry, str):
        return entry
    if entry.prefixlen == entry.max_prefixlen:
        return entry.network_address  # e.g. 198.51.100.7/32
    raise ValueError(
        f"{entry} is a network; explain judges one destination: give one address in it, "
        f"e.g. {next(iter(entry.hosts()), entry.network_address)}"
    )


# address -> (the names whose answers to the sandbox put it in its learned sets, seconds since, seconds left)
LearnedView = Callable[[str], tuple[list[str], float, float] | None]


def _no_learned(address: str) -> tuple[list[str], float, float] | None:
    return None


def _detail(v: Verdict, addr: IPAddress, cache: DnsCache | None, learned: LearnedView) -> dict[str, Any]:
    out: dict[str, Any] = {"address": str(addr), "action": v.action, "step": v.step, "entry": v.entry}
    out["host"] = v.host
    text = str(v)
    seen = learned(str(addr)) if v.via is not None else None
    if seen is not None:
        _, ago, left = seen
        out["learned_ago"], out["learned_left"] = round(ago), round(left)
        text += f", learned {ago:.0f} s ago, {left:.0f} s left"
    elif v.host and v.entry is not None:
        held = cache.held_since(v.entry, str(addr)) if cache is not None else None
        ago, current = held if held is not None else (None, False)
        out["resolved_ago"], out["current"] = ago, current
        when = "" if ago is None else f", resolved {ago:g} s ago"
        text += f" ({addr}{when}{'' if current else ', retained from an earlier answer'})"
    out["text"] = text
    return out


def explain_addresses(
    policy: Policy,
    config: Config,
    cache: DnsCache | None,
    addrs: list[IPAddress],
    learned: LearnedView = _no_learned,
) -> dict[str, Any]:
    """The verdict for each address under the policy in force; `held_closed` says when plan() holds the
    sandbox closed (its allow_internet_access is then false whatever the record says)."""
    enforced, _, closed = enforced_policy(policy, config, cache)
    resolved = cache.addresses if cache is not None else (lambda name: frozenset())

    def names(address: str) -> list[str]:
        seen = learned(address)
        return seen[0] if seen is not None else []

    results = [_detail(decide(enforced, config, a, resolved, names), a, cache, learned) for a in addrs]
    held = None
    if closed is not None:
        held = "held " + closed
        for r in results:
            if r["step"] == "internet":
                r["text"] += f" ({held})"
    notes = []
    if not enforced.allow_internet_access and enforced.allow_out.hostnames and config.sandbox_resolvers:
        for a, r in zip(addrs, results, strict=True):
            guarded = r["step"] in ("embedded-ipv4", "guard.deny")
            if not guarded and within(a, config.sandbox_resolvers):
                notes.append(
                    f"{a}: port 53 (TCP and UDP) is accepted first, as one of [dns] sandbox_resolvers"
                )
    return {"held_closed": held, "results": results, "notes": notes}
