"""The reference decision function follows the documented order of steps."""

import pytest

from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.decide import attribute, decide


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


def test_a_logged_denial_is_attributed_to_the_entry_of_its_own_step_and_the_name_behind_the_address():
    policy = parse_sandbox(
        {
            "id": "a",
            "network_policy": {
                "allow_out": ["api.example.com"],
                "deny_out": ["198.51.100.0/24", "2001:db8:bad::/48", "bad.example.net"],
            },
        }
    ).policy
    config = Config()
    names = {"bad.example.net": {"203.0.113.66"}, "api.example.com": {"169.254.169.254"}}
    resolved = lambda n: names.get(n, set())  # noqa: E731
    assert attribute("deny_out", "198.51.100.9", policy, config, resolved) == ("198.51.100.0/24", None)
    assert attribute("deny_out", "2001:db8:bad::1", policy, config, resolved) == ("2001:db8:bad::/48", None)
    assert attribute("deny_out", "203.0.113.66", policy, config, resolved) == (
        "bad.example.net",
        "bad.example.net",
    )
    # an allowed name that resolves into guard.deny (rebinding): the guard's entry, and the name it came by
    assert attribute("guard.deny", "169.254.169.254", policy, config, resolved) == (
        "169.254.0.0/16",
        "api.example.com",
    )
    assert attribute("guard.private", "10.1.2.3", policy, config, resolved) == ("10.0.0.0/8", None)
    assert attribute("embedded-ipv4", "::ffff:198.51.100.1", policy, config) == ("::ffff:0:0/96", None)
    assert attribute("internet", "192.0.2.1", policy, config, resolved) == (None, None)
    # the step is the kernel's: an address no longer in the list it was denied by keeps its step, no entry
    assert attribute("deny_out", "192.0.2.1", policy, config, resolved) == (None, None)
