"""`egressd explain` without root: decide() with host names, the agent's request, the CLI's output."""

import asyncio
import ipaddress
import json
from dataclasses import replace

import pytest

from egressd import cli
from egressd.agent.daemon import Agent
from egressd.desired.dnscache import NXDOMAIN, RDTYPES, Answer, DnsCache, rdtype_of
from egressd.kernel.fake import FakeBackend
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.decide import decide
from egressd.ruleset.explain import explain_addresses, parse_dest

API, BAD = "api.example.com", "bad.example.com"


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


def resolved(table):
    return lambda name: frozenset(table.get(name, ()))


# --- decide() with host names -------------------------------------------------------------------------------


def test_decide_names_the_host_whose_addresses_matched():
    p = policy(allow_internet_access=False, allow_out=[API])
    v = decide(p, Config(), "203.0.113.10", resolved({API: ["203.0.113.10", "2001:db8::10"]}))
    assert (v.action, v.step, v.entry, v.host) == ("accept", "allow_out", API, True)
    assert str(v) == f"accept: allow_out entry {API}"
    v6 = decide(p, Config(), "2001:db8::10", resolved({API: ["203.0.113.10", "2001:db8::10"]}))
    assert v6.entry == API and v6.action == "accept"


def test_decide_without_resolved_addresses_host_names_match_nothing():
    p = policy(allow_internet_access=False, allow_out=[API])
    assert decide(p, Config(), "203.0.113.10").step == "internet"


def test_decide_keeps_the_kernel_order_for_host_names():
    addrs = resolved({API: ["198.51.100.7", "169.254.169.254"], BAD: ["198.51.100.7", "198.51.100.8"]})
    p = policy(allow_out=["198.51.100.0/24", API], deny_out=[BAD])
    # allow_out CIDR before allow_out host, allow_out host before deny_out host, guard.deny before all.
    assert str(decide(p, Config(), "198.51.100.7", addrs)) == "accept: allow_out 198.51.100.0/24"
    assert str(decide(policy(allow_out=[API], deny_out=[BAD]), Config(), "198.51.100.7", addrs)) == (
        f"accept: allow_out entry {API}"
    )
    assert (
        str(decide(policy(deny_out=[BAD]), Config(), "198.51.100.8", addrs)) == f"deny: deny_out entry {BAD}"
    )
    assert decide(p, Config(), "169.254.169.254", addrs).step == "guard.deny"


# --- parse_dest and explain_addresses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("198.51.100.7", ipaddress.ip_address("198.51.100.7")),
        ("2001:db8::1", ipaddress.ip_address("2001:db8::1")),
        ("198.51.100.7/32", ipaddress.ip_address("198.51.100.7")),
        ("API.Example.com.", API),
    ],
)
def test_parse_dest(text, expected):
    assert parse_dest(text) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "198.51.100.0/24",
            "is a network; explain judges one destination: give one address in it, e.g. 198.51.100.1",
        ),
        ("999.1.1.1", "not a valid IPv4 address"),
        ("api.example.com:443", "looks like host:port"),
        ("https://x.com", "looks like a URL"),
    ],
)
def test_parse_dest_says_what_to_write_instead(text, message):
    with pytest.raises(ValueError) as e:
        parse_dest(text)
    assert message in str(e.value)


def record(cache, name, addrs, ttl):
    """An answer for each record type, with the addresses of its family."""
    for rdtype in RDTYPES:
        cache.record(name, rdtype, Answer("ok", tuple(a for a in addrs if rdtype_of(a) == rdtype), ttl))


def cache_with(**names):
    cache = DnsCache(5, 300, 600, clock=lambda: 100.0)
    cache.subscribe("a", names)
    for name, addrs in names.items():
        record(cache, name, addrs, 60)
    return cache


def test_explain_reports_how_long_ago_a_host_resolved():
    t = [100.0]
    cache = DnsCache(5, 300, 600, clock=lambda: t[0])
    cache.subscribe("a", [API])
    record(cache, API, ["203.0.113.10"], 60)
    t[0] = 112.0
    out = explain_addresses(
        policy(allow_internet_access=False, allow_out=[API]), Config(), cache, [parse_dest("203.0.113.10")]
    )
    (r,) = out["results"]
    assert r["text"] == f"accept: allow_out entry {API} (203.0.113.10, resolved 12 s ago)"
    assert (r["resolved_ago"], r["current"]) == (12.0, True)
    record(cache, API, ["203.0.113.11"], 60)  # the old address is only retained now
    (r,) = explain_addresses(
        policy(allow_internet_access=False, allow_out=[API]), Config(), cache, [parse_dest("203.0.113.10")]
    )["results"]
    assert r["text"].endswith("(203.0.113.10, resolved 12 s ago, retained from an earlier answer)")


def test_explain_holds_closed_exactly_as_plan_does():
    p = policy(deny_out=[BAD])
    cache = DnsCache(5, 300, 600, clock=lambda: 100.0)
    cache.subscribe("a", [BAD])
    out = explain_addresses(p, Config(), cache, [parse_dest("198.51.100.9")])
    assert out["held_closed"] == f"held closed until deny_out hosts resolve: {BAD}"
    assert out["results"][0]["action"] == "deny" and out["results"][0]["step"] == "internet"
    record(cache, BAD, ["198.51.100.8"], 60)
    out = explain_addresses(p, Config(), cache, [parse_dest("198.51.100.9"), parse_dest("198.51.100.8")])
    assert out["held_closed"] is None
    assert [r["text"] for r in out["results"]] == [
        "accept: allow_internet_access=true and no list entry matches",
        f"deny: deny_out entry {BAD} (198.51.100.8, resolved 0 s ago)",
    ]


def test_explain_notes_the_sandbox_resolvers_port_53_rule():
    cfg = config_from_dict({"dns": {"sandbox_resolvers": ["192.0.2.53"]}})
    out = explain_addresses(
        policy(allow_internet_access=False, allow_out=[API]), cfg, cache_with(), [parse_dest("192.0.2.53")]
    )
    assert out["results"][0]["action"] == "deny"
    assert out["notes"] == [
        "192.0.2.53: port 53 (TCP and UDP) is accepted first, as one of [dns] sandbox_resolvers"
    ]


# --- the agent's request ---------------------------------------------------------------------------------------


class FakeResolver:
    def __init__(self, answers):
        self.answers = answers
        self.asked = []

    async def resolve(self, name, rdtype):
        self.asked.append((name, rdtype))
        answer = self.answers.get(name, Answer("nxdomain", error=NXDOMAIN))
        if isinstance(answer, dict):
            return answer[rdtype]
        return replace(answer, addresses=tuple(a for a in answer.addresses if rdtype_of(a) == rdtype))


def ask(tmp_path, requests, answers=None, **np):
    """Run the agent's request handler (no workers, no kernel) on a sandbox 'a' with network_policy np."""
    cfg = config_from_dict({"reconcile": {"watch_changes": False}, "state": {"dir": str(tmp_path / "state")}})

    async def main():
        agent = Agent(cfg, None, {}, FakeBackend(namespaces={"/run/netns/a"}))
        agent.dns.resolver = FakeResolver(answers or {})
        agent.reconciler.upsert(parse_sandbox({"id": "a", "netns": "/run/netns/a", "network_policy": np}))
        record(agent.dns.cache, API, ["198.51.100.10", "2001:db8:1::10"], 60)
        return [await agent.api.handle(r) for r in requests], agent.dns.resolver.asked

    return asyncio.run(main())


def test_request_for_addresses(tmp_path):
    np = {"allow_internet_access": False, "allow_out": ["203.0.113.0/24", API], "deny_out": ["2001:db8::/32"]}
    answers, asked = ask(
        tmp_path,
        [
            {"cmd": "explain", "id": "a", "dest": d}
            for d in ("198.51.100.10", "2001:db8:1::10", "203.0.113.5")
        ],
        **np,
    )
    assert asked == []
    assert [a["results"][0]["text"] for a in answers] == [
        f"accept: allow_out entry {API} (198.51.100.10, resolved 0 s ago)",
        f"accept: allow_out entry {API} (2001:db8:1::10, resolved 0 s ago)",
        "accept: allow_out 203.0.113.0/24",
    ]
    assert (
        answers[0]["sandbox"] == "a" and answers[0]["hostname"] is None and answers[0]["state"] == "pending"
    )


def test_request_for_a_host_name_resolves_it_once_and_judges_every_address(tmp_path):
    other = Answer("ok", ("2001:db8:1::10", "198.51.100.99", "198.51.100.10"), 30)
    (answer,), asked = ask(
        tmp_path,
        [{"cmd": "explain", "id": "a", "dest": "Mirror.Example.com"}],
        {"mirror.example.com": other},
        allow_internet_access=False,
        allow_out=[API],
    )
    assert asked == [("mirror.example.com", "A"), ("mirror.example.com", "AAAA")]
    assert answer["hostname"] == "mirror.example.com"
    assert [(r["address"], r["action"], r["entry"]) for r in answer["results"]] == [
        ("198.51.100.10", "accept", API),
        ("198.51.100.99", "deny", None),
        ("2001:db8:1::10", "accept", API),
    ]


def test_request_for_a_host_name_with_one_type_refused_judges_the_others_addresses(tmp_path):
    refused = Answer("error", error="no nameserver answered: REFUSED from 192.0.2.53")
    v4only = {"A": Answer("ok", ("198.51.100.10", "198.51.100.99"), 30), "AAAA": refused}
    nothing = {"A": Answer("ok"), "AAAA": refused}
    answers, _ = ask(
        tmp_path,
        [{"cmd": "explain", "id": "a", "dest": d} for d in ("v4only.example.com", "nothing.example.com")],
        {"v4only.example.com": v4only, "nothing.example.com": nothing},
        allow_internet_access=False,
        allow_out=[API],
    )
    assert [(r["address"], r["action"]) for r in answers[0]["results"]] == [
        ("198.51.100.10", "accept"),
        ("198.51.100.99", "deny"),
    ]
    assert answers[0]["unresolved"] == {"AAAA": refused.error}
    assert answers[1]["error"] == (
        "destination 'nothing.example.com': cannot resolve it: A: no A records; AAAA: no nameserver "
        "answered: REFUSED from 192.0.2.53; give an address instead"
    )


def test_request_errors_say_what_to_do(tmp_path):
    answers, asked = ask(
        tmp_path,
        [
            {"cmd": "explain", "id": "nope", "dest": "198.51.100.1"},
            {"cmd": "explain", "id": "a", "dest": "198.51.100.0/24"},
            {"cmd": "explain", "id": "a", "dest": "no.example.com"},
            {"cmd": "explain", "id": "a"},
            {"cmd": "explane"},
        ],
    )
    assert answers[0] == {"error": "no sandbox 'nope' is known to the agent; `egressd status` lists them"}
    assert "give one address in it, e.g. 198.51.100.1" in answers[1]["error"]
    assert answers[2]["error"] == (
        "destination 'no.example.com': cannot resolve it: NXDOMAIN: no such name; give an address instead"
    )
    assert '"dest"' in answers[3]["error"]
    assert "expected status, dns, wait, explain or denials" in answers[4]["error"]
    assert asked == [("no.example.com", "A"), ("no.example.com", "AAAA")]


# --- the command line ------------------------------------------------------------------------------------------


def fake_answer(*results, hostname=None, state="enforced"):
    return {
        "sandbox": "a",
        "dest": hostname or results[0]["address"],
        "hostname": hostname,
        "revision": 3,
        "state": state,
        "problem": None,
        "held_closed": None,
        "results": list(results),
        "notes": [],
    }


def result(address, action, text):
    return {"address": address, "action": action, "text": text}


def test_cli_exit_codes_follow_the_verdict(monkeypatch, capsys):
    sent = []

    def answer_with(doc):
        def fake(path, req, timeout=5.0):
            sent.append(req)
            return doc

        return fake

    monkeypatch.setattr(
        cli,
        "request",
        answer_with(fake_answer(result("169.254.169.254", "deny", "deny: guard.deny 169.254.0.0/16"))),
    )
    assert cli.main(["explain", "a", "169.254.169.254"]) == 1
    assert capsys.readouterr().out == "deny: guard.deny 169.254.0.0/16\n"
    assert sent == [{"cmd": "explain", "id": "a", "dest": "169.254.169.254"}]

    both = fake_answer(
        result("198.51.100.10", "accept", "accept: allow_out 198.51.100.0/24"),
        result("2001:db8::10", "accept", "accept: allow_out 2001:db8::/32"),
        hostname=API,
    )
    monkeypatch.setattr(cli, "request", answer_with(both))
    assert cli.main(["explain", "a", API]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "198.51.100.10: accept: allow_out 198.51.100.0/24",
        "2001:db8::10: accept: allow_out 2001:db8::/32",
    ]
    assert cli.main(["explain", "a", API, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == both


def test_cli_says_when_the_sandbox_is_not_enforced_yet(monkeypatch, capsys):
    doc = fake_answer(result("198.51.100.1", "accept", "accept: allow_out 198.51.100.0/24"), state="pending")
    doc["problem"] = "not reconciled yet"
    monkeypatch.setattr(cli, "request", lambda path, req, timeout=5.0: doc)
    assert cli.main(["explain", "a", "198.51.100.1"]) == 0
    assert "note: a is pending: not reconciled yet" in capsys.readouterr().err


def test_cli_without_an_agent_exits_2(tmp_path, capsys):
    assert cli.main(["explain", "a", "198.51.100.1", "--socket", str(tmp_path / "none.sock")]) == 2
    assert "egressd is not running" in capsys.readouterr().err
