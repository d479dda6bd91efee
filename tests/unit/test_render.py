"""The renderer: golden files for representative policies, and the properties every ruleset must have."""

import json
from pathlib import Path

import pytest

from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import FINGERPRINT_CHAIN, STEP_CHAINS, render
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
    assert decide[-1] == [{"goto": {"target": "admit"}}]  # which marks the connection, then accepts


def test_internet_off_ends_in_deny_and_both_families_are_covered():
    sb = parse_sandbox(
        {"id": "a", "network_policy": {"allow_internet_access": False, "allow_out": ["8.8.8.8"]}}
    )
    rs = render(sb.policy, Config())
    # The last rule has no family match: it denies IPv6 even though the policy only named IPv4.
    assert rules(rs, "decide")[-1] == [{"jump": {"target": "log_internet"}}]
    assert rules(rs, "log_internet")[-1] == [{"jump": {"target": "deny"}}]
    assert rules(rs, "output")[-1] == [{"jump": {"target": "decide"}}]
    assert rules(rs, "forward")[-1] == [{"jump": {"target": "decide"}}]
    quiet = render(sb.policy, config_from_dict({"denials": {"log": False}}))
    assert rules(quiet, "decide")[-1] == [{"jump": {"target": "deny"}}]


def test_every_deny_step_logs_under_its_own_name_within_the_rate_limit_then_denies():
    """Each deny path goes through a chain that logs the packet with the step as prefix (the kernel's rate
    limit only ever skips the log line) and then jumps to `deny`: nothing in between can accept."""
    policy = parse_sandbox(
        {
            "id": "a",
            "network_policy": {
                "deny_out": ["198.51.100.0/24", "bad.example.com"],
                "allow_out": ["x.example.org"],
            },
        }
    ).policy
    config = config_from_dict({"denials": {"group": 7, "rate": 5, "burst": 9}})
    rs = render(policy, config)
    steps = {"dns", "embedded-ipv4", "guard.deny", "deny_out", "guard.private"}  # internet: allowed here
    assert {c for c in rs.chains if c.startswith("log_")} == {STEP_CHAINS[s] for s in steps}
    for step in steps:
        chain = STEP_CHAINS[step]
        limit = {"limit": {"rate": 5, "burst": 9, "per": "second"}}
        assert rules(rs, chain) == [
            [limit, {"log": {"prefix": step, "group": 7}}],
            [{"jump": {"target": "deny"}}],
        ]
    # every deny of decide goes through a logging chain: the CIDR and the host-name sets of deny_out alike
    targets = [r[-1]["jump"]["target"] for r in rules(rs, "decide") if "jump" in r[-1]]
    assert "deny" not in targets and targets.count("log_deny_out") == 3  # deny4, deny_dns4, deny_dns6
    assert rs.chains <= rs.names and not any(n.startswith("log_") for n in rs.names - rs.chains)
    # the host side only marks; what it denies is logged where the drop happens (not here)
    host = render(policy, config, host=True)
    assert not any(c.startswith("log_") for c in host.chains)
    # the rate, the burst and the group shape the table: a change rewrites it
    assert (
        render(policy, config_from_dict({"denials": {"rate": 6}})).fingerprint
        != render(policy, Config()).fingerprint
    )


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
    assert rule[1:] == [{"goto": {"target": "admit"}}]  # generation.py
    plain = render(parse_sandbox({"id": "b", "network_policy": {"allow_out": ["192.0.2.1"]}}).policy, cfg)
    off = render(
        named_policy := named_policy_of("*.example.com"), config_from_dict({"dns": {"intercept": False}})
    )
    for rs in (plain, off):
        assert not rs.intercept and rules(rs, "dns_out") == rules(rs, "input") == []
        assert not any("@learned4" in json.dumps(e) for e in rules(rs, "decide"))
    assert named_policy.allow_out.patterns == ("*.example.com",)


def marking(generation):
    keep = {"&": [{"ct": {"key": "mark"}}, 0x0000FFFF]}
    return {"mangle": {"key": {"ct": {"key": "mark"}}, "value": {"|": [keep, generation]}}}


def generation_of(ruleset):
    """The generation the hooks let through first: one rule of output, the same in forward."""
    (check,) = [r for r in rules(ruleset, "output") if len(r) == 2 and "match" in r[0]]
    assert check in rules(ruleset, "forward")
    assert check[0]["match"]["left"] == {"&": [{"ct": {"key": "mark"}}, 0xFFFF0000]}
    assert check[1] == {"accept": None}
    return check[0]["match"]["right"]


@pytest.mark.parametrize("intercept", [False, True])
def test_every_accept_marks_the_connection_with_the_policy_generation(intercept):
    """A connection judged once under a policy is let through by its mark; a new policy re-judges it."""
    policy = {"allow_internet_access": True, "allow_out": ["192.0.2.1", "a.example", "*.b.example"]}
    policy |= {"deny_out": ["198.51.100.0/24", "c.example"]}
    config = config_from_dict({"dns": {"intercept": intercept}, "guard": {"allow": ["10.96.0.10"]}})
    rs = render(parse_sandbox({"id": "a", "network_policy": policy}).policy, config)
    gen = generation_of(rs)
    assert gen and gen & 0x0000FFFF == 0
    assert rules(rs, "output")[0][0]["match"]["right"] == gen  # checked before anything else
    assert rules(rs, "forward")[1][0]["match"]["right"] == gen  # after the uplink's own accept
    # The mark in a rule of its own: a packet without a conntrack entry breaks it, and is still accepted.
    assert rules(rs, "admit") == [[marking(gen)], [{"accept": None}]]
    for expr in rules(rs, "decide"):
        assert expr[-1] != {"accept": None} or _on_link(expr), expr  # every destination step goes to admit
        assert "mark" not in json.dumps(expr)
    accepting = [e for e in rules(rs, "decide") if e[-1] == {"goto": {"target": "admit"}}]
    # guard.allow and allow_out (IPv4 only here), the host names' sets and the learned ones (both families)
    assert len(accepting) == 1 + 1 + 2 + (2 if intercept else 0) + 1
    assert rules(rs, "decide")[-1] == [{"goto": {"target": "admit"}}]  # the internet step too

    def gen_with(**change):
        return generation_of(
            render(parse_sandbox({"id": "b", "network_policy": policy | change}).policy, config)
        )

    assert gen_with() == gen  # the same policy: the same generation, after a restart too
    assert gen_with(allow_out=["192.0.2.1", "a.example", "*.b.example", "192.0.2.2"]) != gen
    assert gen_with(allow_out=["192.0.2.1", "z.example", "*.b.example"]) != gen  # names are not in the table
    assert gen_with(deny_out=["c.example"]) != gen  # tightening or loosening: every connection judged again
    other = render(
        parse_sandbox({"id": "c", "network_policy": policy | {"allow_out": ["a2.example"]}}).policy, config
    )
    again = render(
        parse_sandbox({"id": "d", "network_policy": policy | {"allow_out": ["a3.example"]}}).policy, config
    )
    assert other.shape == again.shape and other.fingerprint != again.fingerprint  # the generation is in it


def _on_link(expr):
    """Step 1's accepts (loopback, replies, neighbour discovery, the proxy): nothing to mark."""
    text = json.dumps(expr)
    return any(k in text for k in ('"oifname"', '"direction"', '"icmpv6"', "127.0.0.1", '"::1"'))


def test_the_host_side_table_carries_no_generation():
    """Its hook runs before conntrack: no mark to set or read there."""
    policy = {"allow_out": ["192.0.2.1", "a.example"]}
    rs = render(parse_sandbox({"id": "a", "network_policy": policy}).policy, Config(), host=True)
    assert '{"ct": {"key": "mark"}}' not in json.dumps(rs.variant + rs.hooks)
    assert rules(rs, "ingress") == [[{"jump": {"target": "decide"}}]]


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


def test_logging_leaves_every_accepting_path_as_it_was():
    """The logging chains sit only on deny paths: with [denials] log on or off, `decide` has the same rules
    in the same order, the base chains are the same, and only the target of a deny differs."""
    policy = parse_sandbox(
        {
            "id": "a",
            "network_policy": {
                "allow_out": ["198.51.100.7", "api.example.com"],
                "deny_out": ["203.0.113.0/24"],
            },
        }
    ).policy
    on, off = render(policy, Config()), render(policy, config_from_dict({"denials": {"log": False}}))
    as_deny = json.loads(json.dumps(rules(on, "decide")).replace('"log_', '"x_'))
    for r in as_deny:
        if "jump" in r[-1] and r[-1]["jump"]["target"].startswith("x_"):
            r[-1] = {"jump": {"target": "deny"}}
    assert as_deny == rules(off, "decide")

    def hooks(rs):  # each policy's own generation aside (the tables differ, so do their generations)
        return json.dumps(rs.hooks).replace(str(rs.generation), "GENERATION")

    assert hooks(on) == hooks(off) and rules(on, "deny") == rules(off, "deny")


@pytest.mark.parametrize("name", sorted(CASES))
def test_digests_are_those_of_the_whole_canonical_text(name):
    """The digests are joined from each command's text; they must be those of json.dumps of the whole list,
    else every table an older egressd wrote would look changed and be written again."""
    import hashlib

    from egressd.ruleset import render as render_module

    policy, config = CASES[name]
    cfg = config_from_dict(config)
    sb = parse_sandbox({"id": "a", "netns": "/run/netns/a", "network_policy": policy})
    variant, hooks, *_ = render_module._build(sb.policy, cfg, False, False, None)
    variant.append({"add": {"set": {"family": "inet", "table": "egressd", "name": "e", "type": "ipv4_addr"}}})
    for where in ("eth0", "host"):

        def sha(obj):
            return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

        bare = [
            {"add": {"set": {k: v for k, v in c["add"]["set"].items() if k != "elem"}}}
            if "set" in c["add"]
            else c
            for c in variant
        ]
        assert render_module._digests(variant, hooks, where) == (
            sha([variant, hooks, where]),
            sha([bare, hooks, where]),
        )
        assert render_module._digests([], hooks, where) == (sha([[], hooks, where]), sha([[], hooks, where]))
