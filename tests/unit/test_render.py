"""The renderer: golden files for representative policies, and the properties every ruleset must have."""

import json
from pathlib import Path

import pytest

from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import FINGERPRINT_CHAIN, render
from egressd.ruleset.transactions import fingerprint_of, replace_table
from egressd.ruleset.variants import create_commands

GOLDEN = Path(__file__).parent.parent / "golden"

CASES = {
    "default": ({}, {}),
    "internet_off_allowlist": (
        {
            "allow_internet_access": False,
            "allow_out": ["10.0.0.0/8", "8.8.8.8", "2001:db8::/32", "::ffff:1.2.3.4"],
        },
        {},
    ),
    "deny_list": ({"deny_out": ["198.51.100.0/24", "203.0.113.7", "2001:db8:bad::/48"]}, {}),
    "drop_and_guard": (
        {"allow_out": ["192.0.2.1"]},
        {
            "enforce": {"deny_action": "drop", "uplink": "veth0"},
            "guard": {"allow": ["10.96.0.10"], "private": [], "deny": ["169.254.169.254"]},
        },
    ),
    "intercept": (
        {
            "allow_internet_access": False,
            "allow_out": ["pypi.org", "*.example.com"],
            "deny_out": ["*.evil.test"],
        },
        {"dns": {"intercept": True}},
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name, update_goldens):
    policy, cfg = CASES[name]
    sb = parse_sandbox({"id": name, "network_policy": policy})
    got = replace_table(render(sb.policy, config_from_dict(cfg)))
    path = GOLDEN / f"{name}.json"
    if update_goldens:
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert got == json.loads(path.read_text()), (
        f"re-render with --update-goldens if {name} changed on purpose"
    )


def rules(ruleset, chain):
    """Rule expressions of one chain, with neutral names (decide, deny, @allow4, ...)."""
    cmds = ruleset.variant + ruleset.hooks
    return [
        c["add"]["rule"]["expr"] for c in cmds if "rule" in c["add"] and c["add"]["rule"]["chain"] == chain
    ]


def test_semantic_order_of_decide_chain():
    sb = parse_sandbox(
        {"id": "a", "network_policy": {"allow_out": ["8.8.8.8", "2001:db8::1"], "deny_out": ["1.1.1.1"]}}
    )
    cfg = config_from_dict({"guard": {"allow": ["10.96.0.10", "fd00::53"]}})
    decide = rules(render(sb.policy, cfg), "decide")
    sets = []
    for expr in decide:
        right = expr[0].get("match", {}).get("right")
        if isinstance(right, str) and right.startswith("@"):
            sets.append(right)
    assert sets == [
        "@embedded6",
        "@guard_deny4",
        "@guard_deny6",
        "@guard_allow4",
        "@guard_allow6",
        "@allow4",
        "@allow6",
        "@deny4",
        "@private4",
        "@private6",
    ]
    assert decide[-1] == [{"accept": None}]


def test_internet_off_ends_in_deny_and_both_families_are_covered():
    sb = parse_sandbox(
        {"id": "a", "network_policy": {"allow_internet_access": False, "allow_out": ["8.8.8.8"]}}
    )
    rs = render(sb.policy, Config())
    # The last rule has no family match: it denies IPv6 even though the policy only named IPv4.
    assert rules(rs, "decide")[-1] == [{"jump": {"target": "deny"}}]
    assert rules(rs, "output") == [[{"jump": {"target": "decide"}}]]
    assert rules(rs, "forward")[-1] == [{"jump": {"target": "decide"}}]


def test_reject_mode_resets_tcp_and_answers_icmp_admin_prohibited():
    deny = rules(render(parse_sandbox({"id": "a"}).policy, Config()), "deny")
    assert deny[0] == [{"counter": "denied"}]
    assert deny[1][-1] == {"reject": {"type": "tcp reset"}}
    assert deny[2] == [{"reject": {"type": "icmpx", "expr": "admin-prohibited"}}]


def test_fingerprint_is_stable_and_changes_with_policy():
    a = parse_sandbox({"id": "a", "network_policy": {"deny_out": ["1.1.1.1", "2.2.2.2"]}})
    b = parse_sandbox({"id": "b", "network_policy": {"deny_out": ["2.2.2.2", "1.1.1.1"]}})
    c = parse_sandbox({"id": "c", "network_policy": {"deny_out": ["1.1.1.1"]}})
    fa, fb, fc = (render(s.policy, Config()).fingerprint for s in (a, b, c))
    assert fa == fb != fc
    assert fa.startswith("egressd/2 sha256:") and len(fa) < 128  # nftables comments are at most 128 bytes
    listing = [c["add"] for c in create_commands(render(a.policy, Config()))]
    assert fingerprint_of(listing) == fa
    assert any(
        c["add"].get("chain", {}).get("name") == FINGERPRINT_CHAIN
        for c in create_commands(render(a.policy, Config()))
    )


def test_fingerprint_changes_with_operator_config():
    p = parse_sandbox({"id": "a"}).policy
    assert (
        render(p, Config()).fingerprint
        != render(p, config_from_dict({"enforce": {"deny_action": "drop"}})).fingerprint
    )


def test_sets_and_chains_exist_before_they_are_referenced():
    rs = render(parse_sandbox({"id": "a", "network_policy": {"allow_out": ["8.8.8.8"]}}).policy, Config())
    defined: set[str] = set()
    for c in create_commands(rs):
        obj = c["add"]
        if "set" in obj:
            defined.add("@" + obj["set"]["name"])
        elif "chain" in obj:
            defined.add(obj["chain"]["name"])
        elif "rule" in obj:
            assert obj["rule"]["chain"] in defined
            for e in obj["rule"]["expr"]:
                target = e.get("jump", {}).get("target")
                right = e.get("match", {}).get("right")
                assert target is None or target in defined
                assert not (isinstance(right, str) and right.startswith("@")) or right in defined


def test_interception_redirects_dns_and_accepts_learned_addresses_only_where_names_are_named():
    cfg = config_from_dict({"dns": {"intercept": True, "proxy_port": 153}})
    named = render(parse_sandbox({"id": "a", "network_policy": {"allow_out": ["*.example.com"]}}).policy, cfg)
    assert named.intercept
    assert rules(named, "dns_out") == [
        [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
            {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}},
            {"redirect": {"port": 153}},
        ]
    ]
    assert rules(named, "input")[0][-2:] == [
        {"match": {"op": "!", "left": {"ct": {"key": "status"}}, "right": "dnat"}},
        {"drop": None},
    ]
    decide = rules(named, "decide")
    assert decide[0] != [{"accept": None}] and decide[0][-1] == {"accept": None}  # the redirected queries
    learned = [e for e in decide if any(m.get("match", {}).get("right") == "@learned4" for m in e)]
    (rule,) = learned
    mark = rule[1]["mangle"]
    generation = mark["value"]["|"][1]
    assert mark["key"] == {"ct": {"key": "mark"}} and mark["value"]["|"][0]["&"][1] == 0x0000FFFF
    assert generation and generation & 0x0000FFFF == 0 and rule[-1] == {"accept": None}
    reply = decide.index(
        [{"match": {"op": "==", "left": {"ct": {"key": "direction"}}, "right": "reply"}}, {"accept": None}]
    )
    carried = [
        {"match": {"op": "==", "left": {"&": [{"ct": {"key": "mark"}}, 0xFFFF0000]}, "right": generation}},
        {"accept": None},
    ]
    assert decide[reply + 1] == carried  # connections a learned address let through under this policy
    again = render(named_policy_of("*.example.com"), cfg)
    other = render(named_policy_of("*.example.com", "192.0.2.1"), cfg)

    def gen_of(rs):
        rule = next(e for e in rules(rs, "decide") if "mangle" in json.dumps(e))
        return rule[1]["mangle"]["value"]["|"][1]

    assert gen_of(again) == generation != gen_of(other)  # stable across restarts, new with a new policy
    assert named.shape == render(named_policy_of("*.example.org"), cfg).shape  # the generation is not shape
    plain = render(parse_sandbox({"id": "b", "network_policy": {"allow_out": ["192.0.2.1"]}}).policy, cfg)
    off = render(
        named_policy := named_policy_of("*.example.com"), config_from_dict({"dns": {"intercept": False}})
    )
    for rs in (plain, off):
        assert not rs.intercept and rules(rs, "dns_out") == rules(rs, "input") == []
        assert not any("@learned4" in json.dumps(e) for e in rules(rs, "decide"))
    assert named_policy.allow_out.patterns == ("*.example.com",)


def named_policy_of(*entries):
    return parse_sandbox({"id": "n", "network_policy": {"allow_out": list(entries)}}).policy


def test_the_host_side_of_an_intercepted_sandbox_accepts_learned_addresses_and_refuses_port_53():
    """Its own table sends every query to the proxy: port 53 on the wire is a packet socket going around it.
    A sandbox with no namespace has no proxy: its host side learns nothing and a deny pattern closes it."""
    from egressd.reconcile.sync import TableSync

    cfg = config_from_dict({"dns": {"intercept": True}})
    pol = named_policy_of("*.example.com")
    host = render(pol, cfg, host=True)
    decide = rules(host, "decide")
    dns53 = [
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": {"set": ["tcp", "udp"]}}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "th", "field": "dport"}}, "right": 53}},
        {"jump": {"target": "deny"}},
    ]
    assert dns53 in decide and any("@learned4" in json.dumps(e) for e in decide)
    assert rules(host, "dns_out") == []  # no redirect on the host side
    sync = TableSync(cfg)
    denies = parse_sandbox({"id": "h", "network_policy": {"deny_out": ["*.evil.test"]}}).policy
    ruleset, _, note = sync.target(denies, None, host=True, intercept=False)
    assert (
        not ruleset.intercept
        and note == "closed because deny_out patterns need [dns] intercept on: *.evil.test"
    )
    ruleset, _, note = sync.target(denies, None, host=True)
    assert ruleset.intercept and note is None
