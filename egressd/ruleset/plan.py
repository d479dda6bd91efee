"""What the kernel is given for one policy right now: the table, the DNS set elements, and whether the
sandbox is held closed while its deny_out names settle. The reconciler, `egressd apply` and `egressd explain`
all ask here, so the three never disagree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from egressd.desired.dnscache import DnsCache
from egressd.model.config import Config
from egressd.model.sandbox import Policy
from egressd.ruleset.dnsrules import intercepting
from egressd.ruleset.render import Ruleset, elements_for, render


def enforced_policy(
    policy: Policy, config: Config, cache: DnsCache | None
) -> tuple[Policy, list[str], str | None]:
    """The policy the kernel is given, the deny_out hosts it waits for, and why it is held closed, if it is:
    while a deny_out host is unresolved, or while a deny_out pattern cannot be enforced (only DNS
    interception enforces patterns), the sandbox is enforced as if allow_internet_access were false.
    plan() and `egressd explain` both use this."""
    waiting = [h for h in policy.deny_out.hostnames if cache is None or not cache.settled(h)]
    blind = [] if intercepting(policy, config) else list(policy.deny_out.patterns)
    if not policy.allow_internet_access or not (waiting or blind):
        return policy, waiting, None
    if blind:
        held = f"closed because deny_out patterns need [dns] intercept on: {', '.join(blind)}"
    else:
        held = f"closed until deny_out hosts resolve: {', '.join(waiting)}"
    return replace(policy, allow_internet_access=False), waiting, held


def plan(
    policy: Policy,
    config: Config,
    cache: DnsCache | None,
    render_fn: Callable[[Policy], Ruleset] | None = None,
) -> tuple[Ruleset, dict[str, frozenset[str]], str | None]:
    """The table and DNS set elements a policy needs now, and why it is held closed, if it is.

    Fail closed: until every deny_out host has resolved once (or failed for good), the sandbox is enforced
    as if allow_internet_access were false. An allow_out host not resolved yet allows nothing.
    """
    allow_hosts, deny_hosts = policy.allow_out.hostnames, policy.deny_out.hostnames
    policy, waiting, held = enforced_policy(policy, config, cache)
    ruleset = render_fn(policy) if render_fn is not None else render(policy, config)
    if not ruleset.dns_sets:
        return ruleset, {}, held
    allow = set().union(*(cache.addresses(h) for h in allow_hosts)) if cache else set()
    deny = set().union(*(cache.addresses(h) for h in deny_hosts)) if cache else set()
    if held is not None:
        note = held
    elif waiting:
        note = f"closed until deny_out hosts resolve: {', '.join(waiting)}"
    else:
        # Not yet the policy asked for either: `wait` should not let a workload start before its names work.
        unresolved = [h for h in allow_hosts if cache is None or not cache.settled(h)]
        note = f"allow_out hosts not resolved yet: {', '.join(unresolved)}" if unresolved else None
    return ruleset, elements_for(ruleset, allow, deny, config.guard.deny), note
