"""The name decision of the DNS proxy (ruleset/names.py): the policy's order, patterns, CNAME chains."""

import pytest

from egressd.model.config import config_from_dict
from egressd.model.entries import pattern_matches
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.explain import explain_addresses, parse_dest
from egressd.ruleset.names import FORWARD, NXDOMAIN, REFUSED, judge_chain, judge_name
from egressd.ruleset.plan import plan


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


@pytest.mark.parametrize(
    ("name", "matches"),
    [
        ("a.example.com", True),
        ("a.b.example.com", True),  # any depth
        ("example.com", False),  # never the apex
        ("badexample.com", False),  # a label boundary, not a suffix of text
        ("a.example.com.evil.test", False),
        ("a.example.org", False),
    ],
)
def test_a_pattern_matches_names_strictly_below_its_domain(name, matches):
    assert pattern_matches("*.example.com", name) is matches


def test_allow_out_wins_over_deny_out_for_names_and_patterns():
    p = policy(allow_internet_access=False, allow_out=["ok.example.com"], deny_out=["*.example.com"])
    v = judge_name(p, "ok.example.com")
    assert (v.action, v.step, v.entry, v.learn) == (FORWARD, "allow_out", "ok.example.com", True)
    v = judge_name(p, "other.example.com")
    assert (v.action, v.step, v.entry, v.learn) == (NXDOMAIN, "deny_out", "*.example.com", False)
    v = judge_name(p, "example.com")  # the apex is not under the pattern: the internet decides
    assert (v.action, v.step, v.entry) == (REFUSED, "internet", None)


def test_the_internet_decides_names_no_list_names():
    assert judge_name(policy(allow_internet_access=True), "x.test").action == FORWARD
    assert judge_name(policy(allow_internet_access=True), "x.test").learn is False
    assert judge_name(policy(allow_internet_access=False), "x.test").action == REFUSED


def test_the_most_specific_pattern_is_named():
    p = policy(allow_out=["*.example.com", "*.cdn.example.com"])
    assert judge_name(p, "a.cdn.example.com").entry == "*.cdn.example.com"
    assert judge_name(p, "a.www.example.com").entry == "*.example.com"
    p = policy(allow_out=["*.example.com", "a.cdn.example.com"])
    assert judge_name(p, "a.cdn.example.com").entry == "a.cdn.example.com"  # the exact name first


def test_a_cname_chain_through_a_denied_name_is_nxdomain():
    p = policy(allow_internet_access=False, allow_out=["pypi.org"], deny_out=["*.evil.test"])
    ok = judge_chain(
        p, ["pypi.org", "dualstack.python.map.fastly.test"]
    )  # a CDN's name: allowed via pypi.org
    assert (ok.action, ok.entry, ok.learn) == (FORWARD, "pypi.org", True)
    bad = judge_chain(p, ["pypi.org", "a.fastly.test", "x.evil.test"])
    assert (bad.action, bad.step, bad.entry) == (NXDOMAIN, "deny_out", "*.evil.test")
    assert judge_chain(p, ["other.test"]).action == REFUSED


def test_a_deny_pattern_without_interception_holds_the_sandbox_closed():
    """Only DNS interception can enforce a pattern: without it, a deny_out pattern closes the sandbox (fail
    closed) and says why; with it, the sandbox is open as its record says."""
    p = policy(allow_internet_access=True, deny_out=["*.evil.test"])
    off, on = config_from_dict({"dns": {"intercept": False}}), config_from_dict({"dns": {"intercept": True}})
    ruleset, _, note = plan(p, off, None)
    assert note == "closed because deny_out patterns need [dns] intercept on: *.evil.test"
    assert ruleset.variant[-1]["add"]["rule"]["expr"] == [
        {"jump": {"target": "log_internet"}}
    ]  # internet: deny
    out = explain_addresses(p, off, None, [parse_dest("203.0.113.5")])
    assert out["results"][0]["action"] == "deny" and out["held_closed"].startswith("held closed because")
    ruleset, _, note = plan(p, on, None)
    assert note is None and ruleset.intercept
    assert ruleset.variant[-1]["add"]["rule"]["expr"] == [{"goto": {"target": "admit"}}]  # accepts
    assert explain_addresses(p, on, None, [parse_dest("203.0.113.5")])["results"][0]["action"] == "accept"


def test_explain_judges_learned_addresses_by_the_entry_that_allowed_their_name():
    p = policy(allow_internet_access=False, allow_out=["*.example.test"], deny_out=["198.51.100.0/24"])
    cfg = config_from_dict({"dns": {"intercept": True}})
    learned = {"198.51.100.7": (["a.example.test"], 3.2, 26.8)}
    out = explain_addresses(
        p, cfg, None, [parse_dest("198.51.100.7"), parse_dest("198.51.100.8")], learned.get
    )
    first, second = out["results"]
    assert first["action"] == "accept" and first["entry"] == "*.example.test"  # allow_out before deny_out
    assert first["text"] == "accept: allow_out *.example.test via a.example.test, learned 3 s ago, 27 s left"
    assert second["action"] == "deny" and second["step"] == "deny_out"  # not learned: the CIDR decides
    stale = {"198.51.100.7": (["gone.other.test"], 1.0, 5.0)}  # a name the policy no longer allows
    out = explain_addresses(p, cfg, None, [parse_dest("198.51.100.7")], stale.get)
    assert out["results"][0]["action"] == "deny"
