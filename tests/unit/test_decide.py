"""The reference decision function follows the documented order of steps."""

import pytest

from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.decide import decide


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


@pytest.mark.parametrize(
    "np, cfg, dst, expected",
    [
        ({}, {}, "198.51.100.1", "accept: allow_internet_access=true and no list entry matches"),
        (
            {"allow_internet_access": False},
            {},
            "198.51.100.1",
            "deny: allow_internet_access=false and no list entry matches",
        ),
        (
            {"allow_internet_access": False},
            {},
            "2001:db8::1",
            "deny: allow_internet_access=false and no list entry matches",
        ),
        ({"allow_out": ["169.254.0.0/16"]}, {}, "169.254.169.254", "deny: guard.deny 169.254.0.0/16"),
        (
            {"deny_out": ["10.96.0.10"]},
            {"guard": {"allow": ["10.96.0.10"]}},
            "10.96.0.10",
            "accept: guard.allow 10.96.0.10/32",
        ),
        (
            {"allow_out": ["198.51.100.0/24"], "deny_out": ["198.51.100.7"]},
            {},
            "198.51.100.7",
            "accept: allow_out 198.51.100.0/24",
        ),
        ({"deny_out": ["198.51.100.0/24"]}, {}, "198.51.100.7", "deny: deny_out 198.51.100.0/24"),
        ({"deny_out": ["198.51.100.0/24"]}, {}, "::ffff:198.51.100.7", "deny: deny_out 198.51.100.0/24"),
        ({}, {}, "10.1.2.3", "deny: guard.private 10.0.0.0/8"),
        ({}, {}, "fd12::1", "deny: guard.private fc00::/7"),
        ({"allow_out": ["10.1.0.0/16"]}, {}, "10.1.2.3", "accept: allow_out 10.1.0.0/16"),
        (
            {},
            {"guard": {"private": []}},
            "10.1.2.3",
            "accept: allow_internet_access=true and no list entry matches",
        ),
        ({"allow_out": ["::/0"]}, {}, "::203.0.113.9", "deny: embedded-ipv4 ::/96"),
    ],
)
def test_steps(np, cfg, dst, expected):
    assert str(decide(policy(**np), config_from_dict(cfg), dst)) == expected


def test_ipv4_rule_never_matches_ipv6():
    v = decide(policy(allow_internet_access=False, allow_out=["0.0.0.0/0"]), Config(), "2001:db8::1")
    assert v.action == "deny" and v.step == "internet"
