"""What DNS interception adds to a sandbox's table: the redirect of every query to the proxy, the learned
sets the proxy fills (docs/hostnames.md, Interception). render.py puts these pieces in place; nothing here
decides the order of `decide`.
"""

from __future__ import annotations

from egressd.model.config import Config
from egressd.model.sandbox import Policy
from egressd.ruleset.exprs import Json, match, meta, payload, rule

# Sets the proxy (intercept/) fills from the sandbox's own answers, each element with a
# timeout. Made once with the table, outside the variants, so an element added between a stage and its
# switch is never lost; emptied by nobody but time.
LEARNED_SETS = ("learned4", "learned6")
# Base chains of every sandbox table besides output and forward: the DNS redirects (nat output for the
# sandbox's processes, nat prerouting for traffic routed through it) and input (only redirected queries
# reach the proxy). Empty unless the sandbox's DNS is intercepted.
INTERCEPT_BASE = (
    {"name": "dns_out", "type": "nat", "hook": "output", "prio": -100, "policy": "accept"},
    {"name": "dns_in", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"},
    {"name": "input", "type": "filter", "hook": "input", "prio": 0, "policy": "accept"},
)


def intercepting(policy: Policy, config: Config) -> bool:
    """Whether egressd answers this sandbox's DNS: [dns] intercept, and a policy that names a host name or
    a pattern in either list. Its host-side table then accepts the learned addresses too (it has no
    redirect: the sandbox's own table sends its queries to the proxy)."""
    return config.intercept.enabled and bool(policy.allow_out.names or policy.deny_out.names)


def dns_l4(port: int) -> tuple[Json, Json]:
    return match(meta("l4proto"), {"set": ["tcp", "udp"]}), match(payload("th", "dport"), port)


def intercept_hooks(config: Config) -> list[Json]:
    """Every DNS query (port 53, any address, TCP and UDP) to the proxy's port, from the sandbox's processes
    and from traffic routed through it (not what comes in from the uplink); and at input, only redirected
    queries reach the proxy: no one outside asks it anything."""
    port = config.intercept.port
    redirect = {"redirect": {"port": port}}
    not_redirected = {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}}
    return [
        rule("dns_out", *dns_l4(53), redirect),
        rule("dns_in", match(meta("iifname"), config.uplink, "!="), *dns_l4(53), redirect),
        rule("input", *dns_l4(port), not_redirected, {"drop": None}),
    ]
