"""Policy records and events: what is accepted, how it is normalised, and what each bad input says."""

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from egressd.model.entries import collapse, normalise_hostname, parse_entry
from egressd.model.events import Delete, Snapshot, Upsert, parse_event
from egressd.model.sandbox import PolicyError, parse_sandbox, sandbox_to_record


def record(**policy):
    return {"id": "sb-1", "netns": "/run/netns/sb-1", "network_policy": policy}


def problems_of(raw, **kw):
    with pytest.raises(PolicyError) as e:
        parse_sandbox(raw, **kw)
    return e.value.problems


def test_defaults_follow_the_seed():
    sb = parse_sandbox({"id": "sb-1"})
    assert sb.policy.allow_internet_access is True
    assert sb.policy.allow_out.nets4 == () and sb.policy.deny_out.hostnames == ()
    assert sb.netns is None and sb.revision is None and sb.status == "running"


def test_null_network_policy_means_defaults():
    assert parse_sandbox({"id": "a", "network_policy": None}).policy.allow_internet_access is True


def test_unknown_fields_are_ignored():
    raw = {**record(allow_out=["8.8.8.8"]), "image": "x", "resources": {"cpus": 1}, "exposed_ports": [80]}
    raw["network_policy"]["future_knob"] = True
    sb = parse_sandbox(raw)
    assert sb.policy.allow_out.nets4 == (ipaddress.ip_network("8.8.8.8/32"),)


def test_entries_are_split_by_kind_and_collapsed():
    sb = parse_sandbox(
        record(allow_out=["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "2001:db8:1::1", "Example.COM."])
    )
    t = sb.policy.allow_out
    assert t.nets4 == (ipaddress.ip_network("10.0.0.0/8"),)
    assert t.nets6 == (ipaddress.ip_network("2001:db8::/32"),)
    assert t.hostnames == ("example.com",)


@pytest.mark.parametrize(
    "entry, expected",
    [
        ("::ffff:198.51.100.7", "198.51.100.7/32"),
        ("::ffff:198.51.100.0/120", "198.51.100.0/24"),
        ("198.51.100.7/24", "198.51.100.0/24"),  # host bits are masked, as nft does
        (" 203.0.113.9 ", "203.0.113.9/32"),
        ("2001:DB8::1", "2001:db8::1/128"),
    ],
)
def test_addresses_are_normalised(entry, expected):
    assert parse_entry(entry) == ipaddress.ip_network(expected)


@pytest.mark.parametrize(
    "entry, says",
    [
        ("999.1.1.1", "not a valid IPv4 address"),
        ("300.0.0.1", "not a valid IPv4 address"),
        ("1.2.3", "an all-numeric name is not a hostname"),
        ("010.1.1.1", "leading zeros"),
        ("10.0.0.0/33", "prefix length 33 is too long for IPv4"),
        ("2001:db8::/129", "prefix length 129 is too long for IPv6"),
        ("10.0.0.0/x", "prefix length after '/' must be a number"),
        ("", "empty entry"),
        ("   ", "empty entry"),
        ("https://example.com/path", "looks like a URL"),
        ("example.com:443", "looks like host:port"),
        ("198.51.100.7:80", "looks like host:port"),
        ("[2001:db8::1]:443", "looks like host:port"),
        ("*.co.uk", "*.co.uk would match every name under the public suffix co.uk"),
        ("*.com", "name a domain below it, e.g. *.example.com"),
        ("api.*.example.com", "a wildcard may only be the whole leftmost label"),
        ("*api.example.com", "a wildcard may only be the whole leftmost label"),
        ("*.exa_mple.com", "may hold only letters, digits and inner hyphens"),
        ("fe80::1%eth0", "scoped IPv6"),
        ("2001:db8:::1", "not a valid IPv6 address"),
        ("exa mple.com", "whitespace"),
        ("a..b", "empty label"),
        ("-a.com", "RFC 1123"),
        ("a_b.com", "RFC 1123"),
        ("foo.123", "all-numeric top-level label"),
        ("a" * 64 + ".com", "the limit is 63"),
        (".".join(["a" * 60] * 5), "the limit is 253"),
        (5, "must be a string"),
        (None, "must be a string"),
        (["8.8.8.8"], "must be a string"),
    ],
)
def test_bad_entries_are_named_with_the_reason(entry, says):
    problems = problems_of(record(deny_out=["8.8.8.8", entry]))
    assert len(problems) == 1
    assert problems[0].startswith("sandbox 'sb-1': network_policy.deny_out[1] ")
    assert says in problems[0]


def test_every_bad_entry_is_reported_not_just_the_first():
    problems = problems_of(record(allow_out=["x:1", "8.8.8.8", "*.a"], deny_out=["300.1.1.1"]))
    assert [p.split(" ")[2] for p in problems] == [
        "network_policy.allow_out[0]",
        "network_policy.allow_out[2]",
        "network_policy.deny_out[0]",
    ]


def test_list_limit_is_configurable():
    entries = [f"203.0.113.{i}" for i in range(11)]
    problems = problems_of(record(allow_out=entries), max_entries=10)
    assert "has 11 entries; the limit is 10" in problems[0]
    assert parse_sandbox(record(allow_out=entries), max_entries=11).policy.allow_out.nets4


def test_default_list_limit_is_4096():
    entries = [str(ipaddress.ip_address("2001:db8::") + i) for i in range(4097)]
    assert "the limit is 4096" in problems_of(record(allow_out=entries))[0]
    assert len(parse_sandbox(record(allow_out=entries[:4096])).policy.allow_out.nets6) >= 1


@pytest.mark.parametrize(
    "raw, says",
    [
        ({"network_policy": {}}, "id: Field required"),
        ({"id": ""}, "sandbox id '' is not valid"),
        ({"id": "a b"}, "is not valid"),
        ({"id": "a", "status": "exploded"}, "status"),
        ({"id": "a", "revision": -1}, "revision"),
        ({"id": "a", "revision": "7"}, None),  # pydantic's lax int: "7" is 7; documented
        ({"id": "a", "netns": "/etc/passwd"}, "must be /run/netns/NAME or /proc/PID/ns/net"),
        ({"id": "a", "netns": "/run/netns/../../etc/x"}, "must be /run/netns/NAME"),
        ({"id": "a", "host_interface": "veth*"}, "host_interface 'veth*' is not an interface name"),
        ({"id": "a", "host_interface": "a-very-long-name0"}, "is not an interface name: use 1-15"),
        ({"id": "a", "host_interface": ""}, "is not an interface name"),
        ({"id": "a", "host_interface": 'x" accept'}, "is not an interface name"),
        ({"id": "a", "host_interface": 7}, "host_interface"),
        ({"id": "a", "network_policy": {"allow_internet_access": "no"}}, "allow_internet_access"),
        ({"id": "a", "network_policy": {"allow_out": "8.8.8.8"}}, "allow_out"),
        ({"id": "a", "network_policy": []}, "network_policy"),
        ([], "must be a JSON object"),
    ],
)
def test_bad_records(raw, says):
    if says is None:
        assert parse_sandbox(raw).revision == 7
        return
    problems = problems_of(raw)
    assert any(says in p for p in problems), problems


def test_idna_names_become_a_labels():
    assert normalise_hostname("Bücher.example.") == "xn--bcher-kva.example"


def test_events():
    up = parse_event({"type": "upsert", "sandbox": record(allow_out=["8.8.8.8"])})
    assert isinstance(up, Upsert) and up.sandbox.id == "sb-1"
    assert parse_event({"type": "delete", "id": "sb-1"}) == Delete("sb-1")
    snap = parse_event({"type": "snapshot", "sandboxes": [{"id": "a"}, {"id": "b"}]})
    assert isinstance(snap, Snapshot) and [s.id for s in snap.sandboxes] == ["a", "b"]


@pytest.mark.parametrize(
    "raw, says",
    [
        ({"type": "upsert"}, 'no "sandbox"'),
        ({"type": "delete"}, 'needs "id"'),
        ({"type": "snapshot", "sandboxes": {}}, 'needs "sandboxes"'),
        ({"type": "rename"}, "unknown event type 'rename'"),
        ("upsert", "must be a JSON object"),
    ],
)
def test_bad_events(raw, says):
    with pytest.raises(PolicyError) as e:
        parse_event(raw)
    assert says in str(e.value)


@pytest.mark.parametrize(
    "nets, expected",
    [
        (["10.0.0.0/8", "10.1.0.0/16"], ["10.0.0.0/8"]),
        (["10.0.0.0/25", "10.0.0.128/25"], ["10.0.0.0/24"]),
        (["10.0.0.1", "10.0.0.2"], ["10.0.0.1/32", "10.0.0.2/32"]),
        (["10.0.0.2", "10.0.0.1", "10.0.0.3"], ["10.0.0.1/32", "10.0.0.2/31"]),
        (["10.0.0.0/24", "10.0.0.0/24"], ["10.0.0.0/24"]),
        (["2001:db8::/32", "10.0.0.0/8", "::a00:0/104"], ["10.0.0.0/8", "::a00:0/104", "2001:db8::/32"]),
    ],
)
def test_collapse_merges_within_a_family_only(nets, expected):
    got = collapse(ipaddress.ip_network(n) for n in nets)
    assert [str(n) for n in got] == expected


def test_collapse_agrees_with_ipaddress_on_random_input():
    import random

    rng = random.Random(7)
    for _ in range(200):
        nets = [
            ipaddress.ip_network((rng.randrange(0, 2**12) << 20, rng.randrange(8, 33)), strict=False)
            for _ in range(20)
        ]
        assert list(collapse(nets)) == list(ipaddress.collapse_addresses(nets))


def test_snapshot_keeps_the_identity_of_rejected_records():
    snap = parse_event(
        {
            "type": "snapshot",
            "sandboxes": [
                {"id": "a"},
                {"id": "b", "netns": "/run/netns/b", "revision": 3, "network_policy": {"deny_out": [""]}},
                {"id": "a"},
                {"network_policy": {}},
            ],
        }
    )
    assert [s.id for s in snap.sandboxes] == ["a"]
    bad, dup, anon = snap.rejected
    assert (bad.sandbox_id, bad.netns, bad.revision) == ("b", "/run/netns/b", 3)
    assert "sandboxes[1]: sandbox 'b': network_policy.deny_out[0]" in bad.problems[0]
    assert dup.sandbox_id == "a" and "listed twice" in dup.problems[0]
    assert anon.sandbox_id is None


def test_invalid_record_error_keeps_identity_when_readable():
    with pytest.raises(PolicyError) as e:
        parse_sandbox(
            {"id": "x", "netns": "/proc/12/ns/net", "revision": 9, "network_policy": {"allow_out": [1]}}
        )
    assert (e.value.sandbox_id, e.value.netns, e.value.revision) == ("x", "/proc/12/ns/net", 9)
    with pytest.raises(PolicyError) as e:
        parse_sandbox({"id": "x y", "netns": "/etc/passwd", "revision": True})
    assert (e.value.sandbox_id, e.value.netns, e.value.revision) == (None, None, None)


def test_record_round_trip():
    sb = parse_sandbox(
        {
            "id": "a",
            "netns": "/run/netns/a",
            "revision": 4,
            "status": "pending",
            "host_interface": "veth-a.1",
            "network_policy": {
                "allow_internet_access": False,
                "allow_out": ["10.0.0.0/8", "2001:db8::1", "x.org"],
            },
        }
    )
    assert sb.host_interface == "veth-a.1"
    assert parse_sandbox(sandbox_to_record(sb)) == sb


def test_a_rejected_record_keeps_a_readable_host_interface():
    with pytest.raises(PolicyError) as e:
        parse_sandbox({"id": "x", "host_interface": "tap7", "network_policy": {"allow_out": [1]}})
    assert e.value.host_interface == "tap7"
    with pytest.raises(PolicyError) as e:
        parse_sandbox({"id": "x", "host_interface": "tap*", "network_policy": {}})
    assert e.value.host_interface is None


_ADDRESSY = st.one_of(
    st.text(alphabet="0123456789abcdefABCDEF:./", min_size=1, max_size=44),
    st.builds(
        lambda a, n: f"{a}/{n}",
        st.one_of(st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).map(str)),
        st.integers(0, 140),
    ),
    st.ip_addresses().map(str),
    st.builds(lambda a: f"::ffff:{a}", st.ip_addresses(v=4).map(str)),
)


@settings(max_examples=3000, deadline=None)
@given(_ADDRESSY)
def test_the_fast_address_parser_agrees_with_the_careful_one(text):
    """fast_network takes well-formed addresses and CIDRs past ipaddress' text parser; whatever it accepts
    must come out exactly as the careful path makes it, and whatever it refuses goes that path."""
    from egressd.model import entries

    def outcome(fast: bool):
        try:
            return entries.parse_network(text) if fast else entries.parse_network_carefully(text)
        except ValueError as e:
            return f"error: {e}"

    fast, careful = outcome(True), outcome(False)
    assert fast == careful and type(fast) is type(careful)
