"""egressd's nftables commands as one raw nf_tables batch (kernel/nfnl_batch.py, nfnl_exprs.py), checked from
the bytes: no root, no kernel (tests/integration/test_nfnl_batch.py runs them against libnftables)."""

import errno
import ipaddress
import re
import struct

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.hostside import target_for
from egressd.kernel.nfnl import NLMSG_ERROR, NLMSGHDR, rule_comment
from egressd.kernel.nfnl_batch import BatchSocket, EncodeError, encode_batch
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from egressd.ruleset.transactions import learn_commands, plan_after, plan_elements, plan_replace

T = {"family": "netdev", "table": "t"}
TABLE = {"family": "netdev", "name": "t"}
SUBSYS = 10 << 8
NEWTABLE, DELTABLE, NEWCHAIN, NEWRULE, NEWSET, NEWSETELEM = 0, 2, 3, 6, 9, 12


def attrs(data: bytes | memoryview) -> list[tuple[int, bool, object]]:
    """(type, nested, value) of each attribute; a nested one's value is its own list."""
    out, off = [], 0
    while off < len(data):
        length, kind = struct.unpack_from("=HH", data, off)
        assert length >= 4 and off + length <= len(data)
        value = bytes(data[off + 4 : off + length])
        nested = bool(kind & 0x8000)
        out.append((kind & 0x3FFF, nested, attrs(value) if nested else value))
        off += (length + 3) & ~3
    return out


def get(tree: list, *path: int):
    """The value at a path of attribute types (the first of each)."""
    for kind in path:
        tree = next(v for k, _, v in tree if k == kind)
    return tree


def messages(batch: bytes) -> list[tuple[int, int, int, bytes, list]]:
    """(type, flags, seq, nfgenmsg, attributes) of each message; the lengths add up to the batch."""
    out, off = [], 0
    while off < len(batch):
        length, kind, flags, seq, pid = NLMSGHDR.unpack_from(batch, off)
        assert pid == 0 and length % 4 == 0
        body = batch[off + 16 : off + length]
        out.append((kind, flags, seq, body[:4], attrs(body[4:])))
        off += length
    assert off == len(batch)
    return out


def rule(*expr, chain="c", **extra):
    return {"add": {"rule": {**T, "chain": chain, "expr": list(expr), **extra}}}


def match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


DADDR6 = {"payload": {"protocol": "ip6", "field": "daddr"}}
SMALL = [
    {"add": {"table": TABLE}},
    {"delete": {"table": TABLE}},
    {"add": {"table": TABLE}},
    {"add": {"chain": {**T, "name": "in", "type": "filter", "hook": "ingress", "dev": "veth0", "prio": -500,
                       "policy": "accept"}}},
    {"add": {"set": {**T, "name": "s4", "type": "ipv4_addr", "flags": ["interval"],
                     "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}}]}}},
    rule(match(DADDR6, {"set": [{"prefix": {"addr": "fe80::", "len": 10}}]}), {"jump": {"target": "in"}},
         comment="egressd/2 sha256:ab"),
]  # fmt: skip


def test_a_small_batch_frames_every_message_and_asks_the_last_for_an_acknowledgement():
    batch = encode_batch(SMALL, seq=100)
    msgs = messages(batch.data)
    assert [m[0] for m in msgs] == [
        0x10, SUBSYS | NEWTABLE, SUBSYS | DELTABLE, SUBSYS | NEWTABLE, SUBSYS | NEWCHAIN, SUBSYS | NEWSET, SUBSYS | NEWSETELEM,
        SUBSYS | NEWSET, SUBSYS | NEWSETELEM, SUBSYS | NEWRULE, 0x11,
    ]  # fmt: skip
    assert [m[2] for m in msgs] == list(range(100, 111))
    assert batch.acked == [109]  # the kernel answers the others only to refuse them
    assert batch.origin == {101: 0, 102: 1, 103: 2, 104: 3, 105: 4, 106: 4, 107: 5, 108: 5, 109: 5}
    begin, end = msgs[0], msgs[-1]
    assert begin[1] == end[1] == 0x1 and begin[3] == end[3] == b"\x00\x00\x00\x0a"  # res_id: nf_tables
    assert all(m[1] & 0x1 and m[3] == b"\x05\x00\x00\x00" for m in msgs[1:-1])  # REQUEST, netdev
    assert msgs[1][1] == 0x1 and msgs[4][1] == 0x401 and msgs[9][1] == 0xC05  # +CREATE, +APPEND; +ACK
    table, chain = msgs[1][4], msgs[4][4]
    assert get(table, 1) == b"t\0" and get(table, 2) == b"\0\0\0\0"
    hook = get(chain, 4)
    assert get(hook, 1) == b"\0\0\0\0" and struct.unpack("!i", get(hook, 2)) == (-500,)
    assert get(hook, 3) == b"veth0\0" and get(chain, 7) == b"filter\0" and get(chain, 5) == b"\0\0\0\x01"
    assert [nested for kind, nested, _ in chain if kind == 4] == [True]


def test_an_interval_set_declared_with_its_elements_gets_libnftables_leading_end_element():
    msgs = messages(encode_batch(SMALL).data)
    named, elems = msgs[5][4], msgs[6][4]
    assert get(named, 3) == b"\0\0\0\x04" and get(named, 5) == b"\0\0\0\x04"  # interval, 4 bytes
    assert get(elems, 4) == get(named, 10)  # the elements name the set's id
    keys = [(get(e, 1, 1), e[0][2] if e[0][0] == 3 else None) for _, _, e in get(elems, 3)]
    assert keys == [
        (b"\0\0\0\0", b"\0\0\0\x01"),
        (bytes([10, 0, 0, 0]), None),
        (bytes([11, 0, 0, 0]), b"\0\0\0\x01"),
    ]


def test_an_anonymous_set_is_bound_to_its_lookup_by_id_and_the_comment_is_the_rule_userdata():
    msgs = messages(encode_batch(SMALL).data)
    anon, rule_attrs = msgs[7][4], msgs[9][4]
    assert get(anon, 2) == b"__set%d\0" and get(anon, 3) == b"\0\0\0\x07"  # anonymous, constant, interval
    exprs = [(get(e, 1), get(e, 2)) for _, _, e in get(rule_attrs, 4)]
    assert [name for name, _ in exprs] == [b"meta\0", b"cmp\0", b"payload\0", b"lookup\0", b"immediate\0"]
    assert get(exprs[3][1], 4) == get(anon, 10) and get(exprs[3][1], 1) == b"__set%d\0"
    assert get(exprs[1][1], 3, 1) == b"\x86\xdd"  # the implicit `meta protocol ip6`
    assert rule_comment(memoryview(get(rule_attrs, 7))) == "egressd/2 sha256:ab"


def test_a_prefix_on_a_byte_boundary_loads_only_its_bytes_and_one_off_the_boundary_is_masked():
    def exprs(bits):
        msgs = messages(encode_batch([rule(match(DADDR6, {"prefix": {"addr": "ff02::", "len": bits}}))]).data)
        return [(get(e, 1), get(e, 2)) for _, _, e in get(msgs[1][4], 4)]

    aligned, masked = exprs(16), exprs(15)
    assert [n for n, _ in aligned] == [b"meta\0", b"cmp\0", b"payload\0", b"cmp\0"]
    assert get(aligned[2][1], 4) == b"\0\0\0\x02" and get(aligned[3][1], 3, 1) == b"\xff\x02"
    assert [n for n, _ in masked] == [b"meta\0", b"cmp\0", b"payload\0", b"bitwise\0", b"cmp\0"]
    assert get(masked[3][1], 4, 1) == b"\xff\xfe" + bytes(14)


LIMIT_LOG = (
    {"limit": {"rate": 50, "burst": 100, "per": "second"}},
    {"log": {"prefix": "deny_out", "group": 2}},
    {"goto": {"target": "deny_a"}},
)
# The limit and the log of that rule as nft -j -f (libnftables 1.0.6) sent them, captured with strace:
# limit RATE, UNIT (u64), BURST, TYPE (pkts), FLAGS (u32); log PREFIX (NUL-terminated), GROUP (be16).
LIMIT_LOG_BYTES = bytes.fromhex(
    "440001800a0001006c696d6974000000340002800c00010000000000000000320c000200000000000000000108000300"
    "000000640800040000000000080005000000000028000180080001006c6f67001c0002800d00020064656e795f6f7574"
    "000000000600010000020000"
)


def rule_exprs(*stmts) -> list[tuple[bytes, list]]:
    """(name, attributes) of each expression of one rule of family netdev."""
    msgs = messages(encode_batch([{"add": {"table": TABLE}}, rule(*stmts)]).data)
    return [(get(e, 1), get(e, 2)) for _, _, e in get(msgs[-2][4], 4)]


def test_limit_and_log_are_sent_as_libnftables_sends_them():
    data = encode_batch([{"add": {"table": TABLE}}, rule(*LIMIT_LOG)]).data
    assert LIMIT_LOG_BYTES in data
    got = rule_exprs(*LIMIT_LOG)
    assert [n for n, _ in got] == [b"limit\0", b"log\0", b"immediate\0"]  # no dependency, no extra
    assert got[0][1] == [
        (1, False, (50).to_bytes(8, "big")),  # NFTA_LIMIT_RATE
        (2, False, (1).to_bytes(8, "big")),  # NFTA_LIMIT_UNIT: seconds
        (3, False, (100).to_bytes(4, "big")),  # NFTA_LIMIT_BURST
        (4, False, bytes(4)),  # NFTA_LIMIT_TYPE: NFT_LIMIT_PKTS
        (5, False, bytes(4)),  # NFTA_LIMIT_FLAGS
    ]
    assert got[1][1] == [(2, False, b"deny_out\0"), (1, False, b"\x00\x02")]  # PREFIX first, then GROUP


@pytest.mark.parametrize(
    ("limit", "unit", "burst"),
    [
        ({"rate": 7, "per": "minute"}, 60, 5),  # no burst: libnftables sends 5
        ({"rate": 7, "per": "hour", "burst": 0}, 3600, 5),  # burst 0 too
        ({"rate": 7, "per": "day", "burst": 1, "rate_unit": "packets"}, 86400, 1),
        ({"rate": 2**64 - 1, "per": "second", "burst": 2**32 - 1, "unit": "packets"}, 1, 2**32 - 1),
    ],
)
def test_a_limit_per_period_and_its_default_burst(limit, unit, burst):
    ((name, got),) = rule_exprs({"limit": limit})
    assert name == b"limit\0" and [k for k, _, _ in got] == [1, 2, 3, 4, 5]
    assert get(got, 1) == limit["rate"].to_bytes(8, "big") and get(got, 2) == unit.to_bytes(8, "big")
    assert get(got, 3) == burst.to_bytes(4, "big") and get(got, 4) == get(got, 5) == bytes(4)


@pytest.mark.parametrize(
    ("log", "attributes"),
    [
        ({"prefix": "x"}, [(2, False, b"x\0")]),  # no level: the kernel's default
        ({"prefix": ""}, [(2, False, b"\0")]),
        ({"prefix": "é" * 63 + "a"}, [(2, False, ("é" * 63 + "a").encode() + b"\0")]),  # 127 bytes
        ({"group": 0}, [(1, False, b"\0\0")]),
        ({"group": 65535, "snaplen": 64, "queue-threshold": 10, "prefix": "p"},
         [(2, False, b"p\0"), (1, False, b"\xff\xff"), (3, False, b"\0\0\0\x40"), (4, False, b"\0\x0a")]),
        ({"group": 3, "snaplen": 0, "queue-threshold": 0},
         [(1, False, b"\0\x03"), (3, False, bytes(4)), (4, False, bytes(2))]),
        ({}, []),
        (None, []),
    ],
)  # fmt: skip
def test_a_log_sends_what_it_is_given_in_libnftables_order(log, attributes):
    assert rule_exprs({"log": log}) == [(b"log\0", attributes)]


@pytest.mark.parametrize(
    ("stmt", "error"),
    [
        ({"limit": {"rate": 5, "per": "second", "rate_unit": "bytes"}}, "anything but packets"),
        ({"limit": {"rate": 5, "per": "second", "rate_unit": "kbytes"}}, "anything but packets"),
        ({"limit": {"rate": 5, "per": "second", "unit": "bytes"}}, "anything but packets"),
        ({"limit": {"rate": 5, "per": "week"}}, "a limit per 'week'"),
        ({"limit": {"rate": 5, "per": ["second"]}}, "a limit per ['second']"),
        ({"limit": {"rate": 5, "per": "second", "inv": True}}, "unsupported limit"),
        ({"limit": {"rate": 5, "per": "second", "burst_unit": "bytes"}}, "unsupported limit"),
        ({"limit": {"rate": 5}}, "unsupported limit"),
        ({"limit": "rate 5/second"}, "unsupported limit"),
        ({"limit": {"rate": 0, "per": "second"}}, "limit rate 0"),
        ({"limit": {"rate": 2**64, "per": "second"}}, "limit rate"),
        ({"limit": {"rate": True, "per": "second"}}, "limit rate True"),
        ({"limit": {"rate": 5, "per": "second", "burst": -1}}, "limit burst -1"),
        ({"limit": {"rate": 5, "per": "second", "burst": 2**32}}, "limit burst"),
        ({"log": {"prefix": "a" * 128}}, "at most 127 bytes"),
        ({"log": {"prefix": "é" * 64}}, "at most 127 bytes"),
        ({"log": {"prefix": "a\0b"}}, "log prefix"),
        ({"log": {"prefix": 7}}, "log prefix"),
        ({"log": {"group": 65536}}, "log group 65536"),
        ({"log": {"group": -1}}, "log group -1"),
        ({"log": {"group": "2"}}, "log group '2'"),
        ({"log": {"group": 2, "snaplen": 2**32}}, "log snaplen"),
        ({"log": {"group": 2, "queue-threshold": 65536}}, "log queue-threshold"),
        ({"log": {"prefix": "x", "snaplen": 64}}, "without a group"),
        ({"log": {"prefix": "x", "level": "info"}}, "unsupported log"),
        ({"log": {"flags": "all"}}, "unsupported log"),
        ({"log": "x"}, "unsupported log"),
    ],
)
def test_a_limit_or_log_the_encoder_does_not_know_is_an_error(stmt, error):
    with pytest.raises(EncodeError, match=re.escape(error)):
        encode_batch([{"add": {"table": TABLE}}, rule(stmt)])


def test_open_and_adjacent_ranges_are_sent_as_libnftables_sends_them():
    cmds = [
        {"delete": {"table": TABLE}},
        {"add": {"table": TABLE}},
        {"add": {"set": {**T, "name": "s", "type": "ipv4_addr", "flags": ["interval"], "elem": [
            {"prefix": {"addr": "0.0.0.0", "len": 8}}, {"prefix": {"addr": "1.0.0.0", "len": 8}},
            {"prefix": {"addr": "255.0.0.0", "len": 8}}]}}},
    ]  # fmt: skip
    elems = get(messages(encode_batch(cmds).data)[4][4], 3)
    keys = [str(ipaddress.IPv4Address(get(e, 1, 1))) for _, _, e in elems]
    ends = [any(k == 3 for k, _, _ in e) for _, _, e in elems]
    open_end = [any(k == 6 for k, _, _ in e) for _, _, e in elems]
    assert keys == ["0.0.0.0", "1.0.0.0", "1.0.0.0", "2.0.0.0", "255.0.0.0"]
    assert ends == [False, True, False, True, False] and open_end == [False] * 4 + [True]


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


@pytest.mark.parametrize(
    "np",
    [
        {
            "allow_internet_access": False,
            "allow_out": ["198.51.100.7", "2001:db8::/32"],
            "deny_out": ["10.1.0.0/16"],
        },
        {
            "allow_out": ["a.example.com", "198.51.100.7"],
            "deny_out": ["*.bad.example.org", "2001:db8:bad::/48"],
        },
        {"allow_internet_access": True, "deny_out": ["0.0.0.0/0", "::/0"]},
    ],
)
@pytest.mark.parametrize(
    "config", [Config(), config_from_dict({"dns": {"intercept": False, "sandbox_resolvers": ["192.0.2.53"]}})]
)
def test_every_host_side_transaction_encodes(np, config):
    target, ruleset = target_for("veth-sb0"), render(policy(**np), config, host=True)
    plan = plan_replace(
        ruleset, {n: ["192.0.2.1"] if n.endswith("4") else ["2001:db8::1"] for n in ruleset.dns_sets}, target
    )
    update = plan_after(ruleset, None, plan.written, target)
    plain = {f"{n}_b": "ipv6_addr" if n.endswith("6") else "ipv4_addr" for n in ruleset.dns_sets}
    plain |= {"learned4": "ipv4_addr", "learned6": "ipv6_addr"}
    elements = plan_elements({n: ["192.0.2.9"] for n in ruleset.dns_sets if n.endswith("4")}, {}, "b", target)
    for cmds in (
        *(s.commands for s in (*plan.steps, *update.steps)),
        elements.commands if elements else [],
        learn_commands({"192.0.2.7": 30, "2001:db8::7": 30}, target, replace=True),
        [{"delete": {"table": {"family": "netdev", "name": target.table}}}],
    ):
        batch = encode_batch(cmds, plain_sets=plain)
        assert len(batch.origin) >= len(cmds) and len(batch.acked) == (1 if cmds else 0)


@pytest.mark.parametrize(
    ("cmds", "error"),
    [
        ([{"insert": {"rule": {**T, "chain": "c", "expr": []}}}], "unsupported command"),
        ([{"add": {"map": {**T, "name": "m"}}}], "unsupported command"),
        ([{"add": {"table": {"family": "ip", "name": "t"}}}], "only netdev and inet"),
        ([{"add": {"chain": {**T, "name": "c", "comment": "x"}}}], "expected the keys"),
        ([rule({"reject": None})], "unsupported statement"),
        ([rule(match({"ct": {"key": "state"}}, "new"))], "unsupported match left side"),
        ([rule(match({"meta": {"key": "l4proto"}}, "sctp"))], "not one this field takes"),
        ([rule(match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp"]}),
               match({"payload": {"protocol": "tcp", "field": "dport"}}, 53))], "conflicting"),
        ([rule(match(DADDR6, "10.0.0.1"))], "not an IPv6 address"),
        ([{"add": {"element": {**T, "name": "dns4", "elem": ["192.0.2.1"]}}}], "neither declared"),
        ([{"add": {"set": {**T, "name": "s", "type": "ipv4_addr", "flags": ["interval"]}}},
          {"add": {"element": {**T, "name": "s", "elem": ["192.0.2.1"]}}}], "may already hold"),
        ([{"create": {"set": {**T, "name": "s", "type": "ipv4_addr", "flags": ["interval"]}}},
          {"add": {"element": {**T, "name": "s", "elem": [{"prefix": {"addr": "10.0.0.0", "len": 8}},
                                                          "10.1.1.1"]}}}], "overlapping"),
        ([{"add": {"set": {**T, "name": "s", "type": "ether_addr"}}}], "set type"),
    ],
)  # fmt: skip
def test_what_the_encoder_does_not_know_is_an_error_naming_the_command(cmds, error):
    with pytest.raises(EncodeError, match=error) as e:
        encode_batch([{"add": {"table": TABLE}}, *cmds])
    assert f"command {len(cmds)} (" in str(e.value)


class FakeSocket:
    """Answers a batch the way the kernel does: an acknowledgement for every message, refusing one."""

    def __init__(self, refuse: int | None = None) -> None:
        self.sent: list[bytes] = []
        self.refuse = refuse
        self.replies: list[bytes] = []

    def setsockopt(self, *args) -> None:
        pass

    def gettimeout(self) -> float | None:
        return 2.0

    def settimeout(self, timeout: float | None) -> None:
        pass

    def sendall(self, data: bytes) -> None:
        self.sent.append(data)
        for kind, flags, seq, _, _ in messages(data):
            if kind not in (0x10, 0x11) and (flags & 0x4 or seq == self.refuse):
                code = -errno.ENOENT if seq == self.refuse else 0
                body = struct.pack("=i", code) + NLMSGHDR.pack(16, kind, 0, seq, 0)
                self.replies.append(NLMSGHDR.pack(16 + len(body), NLMSG_ERROR, 0, seq, 0) + body)

    def recv(self, size: int) -> bytes:
        if not self.replies:
            raise BlockingIOError  # nothing queued (only asked once a refusal was read)
        return self.replies.pop(0)


def test_the_socket_names_the_refused_command_and_sends_nothing_it_cannot_encode():
    fake = FakeSocket(refuse=7)  # the second batch (begin 5): table 6, chain 7
    sock = BatchSocket(fake, "ns")  # type: ignore[arg-type]
    sock.run([{"add": {"table": TABLE}}, {"add": {"chain": {**T, "name": "c"}}}])
    with pytest.raises(ApplyError, match=r"No such file or directory \(command 1: add chain netdev t c\)"):
        sock.run([{"add": {"table": TABLE}}, {"add": {"chain": {**T, "name": "c"}}}])
    with pytest.raises(EncodeError):
        sock.run([{"add": {"table": TABLE}}, {"add": {"flowtable": {**T, "name": "f"}}}])
    assert len(fake.sent) == 2
    sock.run([])
    assert len(fake.sent) == 2
