"""What the kernel is given for one policy right now: the table, the DNS set elements, and whether the
sandbox is held closed while its deny_out names settle. The reconciler, `egressd apply` and `egressd explain`
all ask here, so the three never disagree."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from egressd.desired.dnscache import DnsCache
from egressd.model.config import Config
from egressd.model.sandbox import Policy
from egressd.ruleset.render import Ruleset, elements_for, render


def enforced_policy(policy: Policy, cache: DnsCache | None) -> tuple[Policy, list[str]]:
    """The policy the kernel is given, and the deny_out hosts it waits for: while any is unresolved, the
    sandbox is held closed (allow_internet_access false). plan() and `egressd explain` both use this."""
    waiting = [h for h in policy.deny_out.hostnames if cache is None or not cache.settled(h)]
    if waiting and policy.allow_internet_access:
        policy = replace(policy, allow_internet_access=False)
    return policy, waiting


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
    policy, waiting = enforced_policy(policy, cache)
    ruleset = render_fn(policy) if render_fn is not None else render(policy, config)
    if not ruleset.dns_sets:
        return ruleset, {}, None
    allow = set().union(*(cache.addresses(h) for h in allow_hosts)) if cache else set()
    deny = set().union(*(cache.addresses(h) for h in deny_hosts)) if cache else set()
    if waiting:
        note = f"closed until deny_out hosts resolve: {', '.join(waiting)}"
    else:
        # Not yet the policy asked for either: `wait` should not let a workload start before its names work.
        unresolved = [h for h in allow_hosts if cache is None or not cache.settled(h)]
        note = f"allow_out hosts not resolved yet: {', '.join(unresolved)}" if unresolved else None
    return ruleset, elements_for(ruleset, allow, deny, config.guard.deny), note
