"""Property tests of everything that decodes input: any input gives a valid model or a clear error."""

import ipaddress
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from egressd.model.config import Config
from egressd.model.entries import parse_entry
from egressd.model.events import Snapshot, Upsert, parse_event, parse_line
from egressd.model.sandbox import PolicyError, parse_sandbox
from egressd.ruleset.decide import decide
from egressd.ruleset.render import render

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)

entry_like = st.one_of(
    st.text(max_size=40),
    st.from_regex(r"[0-9]{1,4}(\.[0-9]{1,4}){0,4}(/[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[0-9a-f:]{2,40}(/[0-9]{1,3})?", fullmatch=True),
    st.from_regex(r"[a-zA-Z0-9*_-]{1,20}(\.[a-zA-Z0-9*_-]{0,20}){0,4}\.?(:[0-9]{1,5})?", fullmatch=True),
    st.integers(),
    st.none(),
)

record_like = st.fixed_dictionaries(
    {"id": st.one_of(st.text(max_size=20), st.integers(), st.just("sb-1"))},
    optional={
        "netns": st.one_of(st.text(max_size=30), st.just("/run/netns/x"), st.just("/proc/12/ns/net")),
        "revision": st.one_of(st.integers(), st.text(max_size=5), st.booleans()),
        "status": st.text(max_size=12),
        "network_policy": st.one_of(
            st.none(),
            json_values,
            st.fixed_dictionaries(
                {},
                optional={
                    "allow_internet_access": st.one_of(st.booleans(), json_values),
                    "allow_out": st.lists(entry_like, max_size=6),
                    "deny_out": st.lists(entry_like, max_size=6),
                },
            ),
        ),
    },
)


def _clear(err: PolicyError) -> None:
    assert err.problems and all(isinstance(p, str) and p for p in err.problems)


@SETTINGS
@given(entry_like)
def test_an_entry_is_a_network_a_hostname_or_a_clear_error(value):
    try:
        out = parse_entry(value)
    except ValueError as e:
        assert str(e)
        return
    assert isinstance(out, ipaddress.IPv4Network | ipaddress.IPv6Network) or (
        isinstance(out, str) and out == out.lower() and not out.endswith(".") and len(out) <= 253
    )


@SETTINGS
@given(record_like)
def test_a_record_is_a_sandbox_or_a_clear_error(raw):
    try:
        sb = parse_sandbox(raw)
    except PolicyError as e:
        _clear(e)
        return
    assert sb.id == raw["id"]
    render(sb.policy, Config())  # every valid policy renders


@SETTINGS
@given(
    st.one_of(json_values, st.fixed_dictionaries({"type": st.sampled_from(["upsert", "delete", "snapshot"])}))
)
def test_an_event_is_an_event_or_a_clear_error(raw):
    try:
        event = parse_event(raw)
    except PolicyError as e:
        _clear(e)
        return
    assert isinstance(event, Upsert | Snapshot) or event.id


@SETTINGS
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200).map(lambda b: b.decode("utf-8", "replace"))))
def test_any_line_is_an_event_or_a_clear_error(text):
    try:
        parse_line(text)
    except PolicyError as e:
        _clear(e)


@SETTINGS
@given(st.builds(lambda r: json.dumps({"type": "upsert", "sandbox": r}), record_like))
def test_any_upsert_line_is_an_event_or_a_clear_error(text):
    try:
        parse_line(text)
    except PolicyError as e:
        _clear(e)


def test_hostile_json_shapes_are_clear_errors():
    for text in ("[" * 100_000, '{"a":' * 50_000, "9" * 10_000, '"\\ud800"', "{}" * 3):
        try:
            parse_line(text)
        except PolicyError as e:
            _clear(e)


addresses = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.sampled_from(
        ["169.254.169.254", "10.1.2.3", "198.51.100.7", "2001:db8::1", "fd00::1", "::ffff:10.0.0.1"]
    ),
)
networks = st.builds(
    lambda a, n: str(
        ipaddress.ip_network(f"{a}/{min(n, ipaddress.ip_address(a).max_prefixlen)}", strict=False)
    ),
    addresses,
    st.integers(0, 128),
)


@SETTINGS
@given(st.booleans(), st.lists(networks, max_size=5), st.lists(networks, max_size=5), addresses)
def test_decide_is_total_and_guard_deny_always_wins(internet, allow, deny, dst):
    policy = parse_sandbox(
        {
            "id": "p",
            "network_policy": {"allow_internet_access": internet, "allow_out": allow, "deny_out": deny},
        }
    ).policy
    verdict = decide(policy, Config(), dst)
    assert verdict.action in ("accept", "deny")
    ip = ipaddress.ip_address(dst)
    ip = ip.ipv4_mapped or ip if ip.version == 6 else ip
    if any(ip.version == n.version and ip in n for n in Config().guard.deny):
        assert (verdict.action, verdict.step) == ("deny", "guard.deny")
