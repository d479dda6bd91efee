"""A sandbox's own table (family inet) as one raw nf_tables batch (kernel/nfnl_encode.py, nfnl_inet.py),
checked from the bytes: no root, no kernel (tests/integration/test_nfnl_sandbox.py compares them with what
libnftables sends, and the tables with what it writes)."""

import json
import struct
from pathlib import Path

import pytest

from egressd.kernel import nfnl_encode
from egressd.kernel.nfnl_batch import EncodeError, encode_batch
from egressd.kernel.nfnl_sandbox import PLAIN_SETS
from egressd.model.config import config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from egressd.ruleset.transactions import learn_commands, plan_after, plan_elements, plan_replace
from tests.unit.test_nfnl_batch import LIMIT_LOG, LIMIT_LOG_BYTES, get, messages
from tests.unit.test_render import CASES

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
T = {"family": "inet", "table": "egressd"}
CT_MARK = {"ct": {"key": "mark"}}


def rule(*expr, chain="c"):
    return {"add": {"rule": {**T, "chain": chain, "expr": list(expr)}}}


def match(left, right, op="=="):
    return {"match": {"op": op, "left": left, "right": right}}


def exprs(*stmts) -> list[tuple[bytes, list]]:
    """(name, attributes) of each expression of one rule, in a table of its own."""
    msgs = messages(
        encode_batch([{"add": {"table": {"family": "inet", "name": "egressd"}}}, rule(*stmts)]).data
    )
    assert msgs[2][3] == b"\x01\x00\x00\x00"  # family inet
    return [(get(e, 1), get(e, 2)) for _, _, e in get(msgs[-2][4], 4)]  # the rule: the last message


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_golden_table_encodes_the_same_from_the_rule_cache_as_afresh(name):
    doc = json.loads((GOLDEN / f"{name}.json").read_text())["nftables"]
    nfnl_encode.RULES.clear()
    nfnl_encode.SETS.clear()
    fresh = encode_batch(doc, 7, PLAIN_SETS)
    again = encode_batch(doc, 7, PLAIN_SETS)
    assert again == fresh
    rules = [c["add"]["rule"] for c in doc if "rule" in c.get("add", {})]
    assert 0 < len(nfnl_encode.RULES) <= sum("comment" not in r for r in rules)  # not the fingerprint's
    filled = [c for c in doc if c.get("add", {}).get("set", {}).get("elem")]
    assert len(nfnl_encode.SETS) == len(filled)  # sets with elements are kept too
    # The same rules after one more set in the batch: other set ids, so nothing cached is used for them.
    extra = [doc[0], {"add": {"set": {**T, "name": "extra", "type": "ipv4_addr"}}}, *doc[1:]]
    shifted = encode_batch(extra, 7, PLAIN_SETS)
    assert encode_batch(doc, 7, PLAIN_SETS) == fresh  # both forms of a rule are kept, each still right
    assert encode_batch(extra, 7, PLAIN_SETS) == shifted
    nfnl_encode.RULES.clear()
    nfnl_encode.SETS.clear()
    assert encode_batch(extra, 7, PLAIN_SETS) == shifted


def test_every_transaction_of_a_sandbox_table_encodes():
    config = config_from_dict({"dns": {"sandbox_resolvers": ["192.0.2.53"]}})
    for np in ({"allow_out": ["a.example.com", "198.51.100.7"], "deny_out": ["*.bad.example.org"]}, {}):
        ruleset = render(parse_sandbox({"id": "a", "network_policy": np}).policy, config)
        plan = plan_replace(ruleset, None)
        update = plan_after(ruleset, None, plan.written)
        add = {n: ["2001:db8::9" if n.endswith("6") else "192.0.2.9"] for n in ruleset.dns_sets}
        elements = plan_elements(add, {}, "b")
        for cmds in (
            *(s.commands for s in (*plan.steps, *update.steps)),
            elements.commands if elements else [],
            learn_commands({"192.0.2.7": 30, "2001:db8::7": 30}, replace=True),
            [{"delete": {"table": {"family": "inet", "name": "egressd"}}}],
        ):
            assert len(encode_batch(cmds, plain_sets=PLAIN_SETS).origin) >= len(cmds)


def test_ip_fields_depend_on_nfproto_and_icmpv6_on_the_transport_as_well():
    got = exprs(
        match({"payload": {"protocol": "icmpv6", "field": "type"}}, "nd-neighbor-solicit"),
        match({"payload": {"protocol": "ip6", "field": "hoplimit"}}, 255),
        {"accept": None},
    )
    assert [n for n, _ in got] == [
        b"meta\x00",
        b"cmp\x00",
        b"meta\x00",
        b"cmp\x00",
        b"payload\x00",
        b"cmp\x00",
        b"payload\x00",
        b"cmp\x00",
        b"immediate\x00",
    ]
    assert get(got[0][1], 2) == b"\0\0\0\x0f" and get(got[1][1], 3, 1) == b"\x0a"  # meta nfproto ipv6
    assert get(got[3][1], 3, 1) == b"\x3a"  # meta l4proto ipv6-icmp


def test_interface_names_are_compared_whole_and_ct_keys_in_host_order():
    got = exprs(
        match({"meta": {"key": "iifname"}}, "eth0", "!="), match({"ct": {"key": "direction"}}, "reply")
    )
    assert get(got[0][1], 2) == b"\0\0\0\x06" and get(got[1][1], 2) == b"\0\0\0\x01"  # iifname, NFT_CMP_NEQ
    assert get(got[1][1], 3, 1) == b"eth0" + bytes(12)
    assert get(got[2][1], 2) == b"\0\0\0\x01" and get(got[3][1], 3, 1) == b"\x01"  # ct direction reply
    masked = exprs(match({"&": [CT_MARK, 0xFFFF0000]}, 0x12340000), {"accept": None})
    assert [n for n, _ in masked] == [b"ct\0", b"bitwise\0", b"cmp\0", b"immediate\0"]
    assert get(masked[1][1], 4, 1) == struct.pack("=I", 0xFFFF0000)
    assert get(masked[2][1], 3, 1) == struct.pack("=I", 0x12340000)


def test_a_flag_test_masks_without_naming_the_operation():
    got = exprs(match({"ct": {"key": "status"}}, "dnat", "!"), {"drop": None})
    assert [n for n, _ in got] == [b"ct\0", b"bitwise\0", b"cmp\0", b"immediate\0"]
    assert [k for k, _, _ in got[1][1]] == [1, 2, 3, 4, 5]  # no NFTA_BITWISE_OP
    assert get(got[1][1], 4, 1) == struct.pack("=I", 0x20) and get(got[2][1], 3, 1) == bytes(4)


def test_a_ct_mark_chain_is_folded_into_one_bitwise():
    value = {"|": [{"&": [CT_MARK, 0xFFFF]}, 0xB6FC0000]}
    got = exprs({"mangle": {"key": CT_MARK, "value": value}})
    assert [n for n, _ in got] == [b"ct\0", b"bitwise\0", b"ct\0"]
    assert get(got[1][1], 4, 1) == struct.pack("=I", 0xFFFF) and get(got[1][1], 5, 1) == struct.pack(
        "=I", 0xB6FC0000
    )
    assert get(got[2][1], 2) == b"\0\0\0\x03" and get(got[2][1], 4) == b"\0\0\0\x01"  # ct mark set from reg 1
    constant = exprs({"mangle": {"key": CT_MARK, "value": 7}})
    assert [n for n, _ in constant] == [b"immediate\0", b"ct\0"]


def test_reject_and_redirect():
    tcp = match({"meta": {"key": "l4proto"}}, "tcp")
    got = exprs(tcp, {"reject": {"type": "tcp reset"}})
    assert get(got[2][1], 1) == b"\0\0\0\x01" and get(got[2][1], 2) == b"\x00"
    got = exprs({"reject": {"type": "icmpx", "expr": "admin-prohibited"}})
    assert get(got[0][1], 1) == b"\0\0\0\x02" and get(got[0][1], 2) == b"\x03"
    l4 = match({"meta": {"key": "l4proto"}}, {"set": ["tcp", "udp"]})
    got = exprs(l4, match({"payload": {"protocol": "th", "field": "dport"}}, 53), {"redirect": {"port": 153}})
    assert [n for n, _ in got][-2:] == [b"immediate\0", b"redir\0"]
    assert get(got[-2][1], 2, 1) == b"\x00\x99" and get(got[-1][1], 3) == b"\0\0\0\x02"


def test_inet_base_chains_have_no_device_and_nat_is_a_type():
    chain = {**T, "name": "dns_in", "type": "nat", "hook": "prerouting", "prio": -100, "policy": "accept"}
    msgs = messages(
        encode_batch(
            [{"add": {"table": {"family": "inet", "name": "egressd"}}}, {"add": {"chain": chain}}]
        ).data
    )
    hook = get(msgs[2][4], 4)
    assert get(hook, 1) == b"\0\0\0\0" and struct.unpack("!i", get(hook, 2)) == (-100,)
    assert [k for k, _, _ in hook] == [1, 2] and get(msgs[2][4], 7) == b"nat\0"


def test_limit_and_log_are_sent_in_inet_as_in_netdev():
    """A step's logging chain in a sandbox's own table: what libnftables sends (test_nfnl_batch's bytes),
    with no dependency of its own after a match."""
    data = encode_batch([{"add": {"table": {"family": "inet", "name": "egressd"}}}, rule(*LIMIT_LOG)]).data
    assert LIMIT_LOG_BYTES in data
    got = exprs(match({"meta": {"key": "l4proto"}}, "tcp"), *LIMIT_LOG)
    assert [n for n, _ in got] == [b"meta\0", b"cmp\0", b"limit\0", b"log\0", b"immediate\0"]
    assert get(got[4][1], 2, 2, 1) == struct.pack("!i", -4)  # goto
    assert get(got[4][1], 2, 2, 2) == b"deny_a\0"


@pytest.mark.parametrize(
    ("stmts", "error"),
    [
        ([{"log": {"prefix": "x", "level": "info"}}], "unsupported log"),
        ([{"limit": {"rate": 5, "per": "second", "rate_unit": "bytes"}}], "anything but packets"),
        ([{"reject": {"type": "tcp reset"}}], "explicit `meta l4proto tcp`"),
        ([{"reject": None}], "unsupported statement"),
        ([{"redirect": {"port": 153}}], "transport protocol match"),
        ([match({"ct": {"key": "mark"}}, 1, "!")], "`!` on"),
        ([match({"meta": {"key": "oifname"}}, "eth*")], "interface name"),
        ([match({"ct": {"key": "direction"}}, {"set": ["reply"]})], "no set type"),
        ([{"mangle": {"key": CT_MARK, "value": {"|": [{"meta": {"key": "mark"}}, 1]}}}], "ct mark value"),
        ([match({"ct": {"key": "state"}}, "new")], "unsupported match left side"),
    ],
)
def test_what_the_inet_encoder_does_not_know_is_an_error(stmts, error):
    with pytest.raises(EncodeError, match=error):
        exprs(*stmts)


def test_an_inet_base_chain_names_no_device_and_an_inet_hook():
    chain = {**T, "name": "x", "type": "filter", "hook": "ingress", "prio": 0}
    with pytest.raises(EncodeError, match="expected the keys"):
        encode_batch([{"add": {"chain": {**chain, "dev": "eth0"}}}])
    with pytest.raises(EncodeError, match="a base chain of inet"):
        encode_batch([{"add": {"chain": chain}}])
