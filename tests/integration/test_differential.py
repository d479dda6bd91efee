"""The kernel and the reference decision agree: random policies, random destinations, real packets.

Also: every valid policy hypothesis can think of renders to a ruleset the kernel accepts (libnftables
checks it in a dry run inside a sandbox namespace, which commits nothing).
"""

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.kernel.netns import ContextCache
from egressd.model.config import config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.decide import decide
from egressd.ruleset.render import render
from egressd.ruleset.transactions import replace_table
from netns_fixtures.probe import udp_echo

pytestmark = pytest.mark.root

# Destinations the world answers UDP echo on: documentation addresses (all local in the inet namespace)
# and the inet namespace's link addresses, which are private ranges.
UNIVERSE4 = [
    "192.0.2.1",
    "192.0.2.200",
    "198.51.100.7",
    "198.51.100.130",
    "203.0.113.9",
    "203.0.113.250",
    "10.255.0.2",
]
UNIVERSE6 = ["2001:db8::7", "2001:db8:1::10", "2001:db8:ffff::1", "fd00:255::2"]
UNIVERSE = UNIVERSE4 + UNIVERSE6


def _prefixes(addr: str) -> list[str]:
    ip = ipaddress.ip_address(addr)
    lengths = (32, 30, 25, 24, 16, 8) if ip.version == 4 else (128, 64, 48, 32, 16)
    return [str(ipaddress.ip_network(f"{addr}/{n}", strict=False)) for n in lengths]


entries = st.sampled_from(sorted({p for a in UNIVERSE for p in _prefixes(a)} | set(UNIVERSE)))
guards = st.fixed_dictionaries(
    {
        "allow": st.lists(entries, max_size=2),
        "deny": st.lists(entries, max_size=2),
        "private": st.sampled_from([["10.0.0.0/8", "fc00::/7"], []]),
    }
)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    internet=st.booleans(),
    allow=st.lists(entries, max_size=4),
    deny=st.lists(entries, max_size=4),
    guard=guards,
    dsts=st.lists(st.sampled_from(UNIVERSE), min_size=3, max_size=6, unique=True),
)
def test_kernel_agrees_with_the_reference_decision(world, backend, internet, allow, deny, guard, dsts):
    sb = world.sandboxes[1]
    config = config_from_dict({"guard": guard})
    policy = parse_sandbox(
        {
            "id": "d",
            "network_policy": {"allow_internet_access": internet, "allow_out": allow, "deny_out": deny},
        }
    ).policy
    backend.apply(sb.netns_path, render(policy, config))
    try:
        for dst in dsts:
            want = decide(policy, config, dst)
            got = udp_echo(sb.name, dst, 7, timeout=0.5)
            assert got == ("reply" if want.action == "accept" else "unreachable"), (dst, str(want))
    finally:
        backend.remove(sb.netns_path)


def _dry_run_nft():
    import nftables

    nft = nftables.Nftables()
    nft.set_dry_run(True)
    return nft


addresses = st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str))
any_network = st.builds(
    lambda a, n: str(
        ipaddress.ip_network(f"{a}/{min(n, ipaddress.ip_address(a).max_prefixlen)}", strict=False)
    ),
    addresses,
    st.integers(0, 128),
)
hostnames = st.from_regex(r"[a-z]([a-z0-9-]{0,8}[a-z0-9])?(\.[a-z][a-z0-9]{0,10}){1,3}", fullmatch=True)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    internet=st.booleans(),
    allow=st.lists(st.one_of(any_network, hostnames), max_size=20),
    deny=st.lists(st.one_of(any_network, hostnames), max_size=20),
    action=st.sampled_from(["reject", "drop"]),
    resolvers=st.lists(addresses, max_size=2),
)
def test_every_valid_policy_renders_to_a_ruleset_the_kernel_accepts(
    world, internet, allow, deny, action, resolvers
):
    sb = world.sandboxes[1]
    config = config_from_dict({"enforce": {"deny_action": action}, "dns": {"sandbox_resolvers": resolvers}})
    policy = parse_sandbox(
        {
            "id": "r",
            "network_policy": {"allow_internet_access": internet, "allow_out": allow, "deny_out": deny},
        }
    ).policy
    ruleset = render(policy, config)
    elements = {name: {"198.51.100.1" if name.endswith("4") else "2001:db8::1"} for name in ruleset.dns_sets}
    cache = ContextCache(_dry_run_nft)
    try:
        nft, _ = cache.get(sb.netns_path)
        rc, _, err = nft.json_cmd(replace_table(ruleset, elements))
        assert rc == 0, err
    finally:
        cache.close()
