"""The raw listing of one table (nfnl_listing.py), from nf_tables messages built here: no root, no kernel.

A fake kernel answers the requests as the real one does (tests/integration/test_nfnl_listing.py checks that
part on this kernel): rule, set and object dumps filtered by table, table and chain dumps not, a plain GET
answered by one message or ENOENT. Expressions are made with nfnl_exprs, the raw writer's own encoders."""

import errno
import ipaddress
import struct

import pytest

from egressd.kernel import nfnl_exprs as nx
from egressd.kernel.backend import ApplyError
from egressd.kernel.hostside import HostBackend, neutral_listing, table_name
from egressd.kernel.nfnl import NLMSGHDR, NetlinkError, attr, attributes, nested
from egressd.kernel.nfnl_listing import (
    ListingSocket,
    chain_item,
    element_rows,
    expressions,
    object_item,
    set_item,
)
from egressd.model.config import Config
from egressd.model.sandbox import parse_sandbox
from egressd.reconcile.sync import elements_differ, listing_digest
from egressd.ruleset.render import render
from egressd.ruleset.transactions import active_variant, fingerprint_of, retire_commands, set_elements
from egressd.ruleset.variants import Target
from tests.unit.test_nfnl_batch import LIMIT_LOG

u32, strz, element = nx.u32, nx.strz, nx.element
TABLE = "egressd_i0123456789ab"
FP = "egressd/2 sha256:" + "ab" * 32


def a(text: str) -> int:
    return int(ipaddress.ip_address(text))


def u64(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack("!Q", value))


def rule_exprs(*statements) -> bytes:
    enc = nx.RuleEncoder(lambda name: None, lambda: 1)
    for stmt in statements:
        enc.statement(stmt)
    return b"".join(enc.exprs)


def lookup(name: str, sreg: int = 1) -> bytes:
    return nx.expression("lookup", strz(1, name), u32(2, sreg), u32(4, 7), u32(5, 0))


def decoded(body: bytes):
    return expressions(memoryview(body))


# --- decoding ---------------------------------------------------------------------------------------------


def test_verdicts_and_jumps_are_listed_as_libnftables_lists_them():
    body = rule_exprs({"accept": None}, {"drop": None}, {"return": None}, {"continue": None})
    body += rule_exprs({"jump": {"target": "decide_a"}}, {"goto": {"target": "admit_b"}})
    assert decoded(body) == [
        {"accept": None}, {"drop": None}, {"return": None}, {"continue": None},
        {"jump": {"target": "decide_a"}}, {"goto": {"target": "admit_b"}},
    ]  # fmt: skip


def test_matches_are_listed_with_their_registers_and_values():
    match = {
        "match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "daddr"}}, "right": "@allow4_a"}
    }
    out = decoded(rule_exprs(match, {"counter": "denied"}))
    assert out == [
        {"meta": {"key": nx.NFT_META_PROTOCOL, "dreg": 1}},
        {"cmp": {"sreg": 1, "op": 0, "data": "0800"}},
        {"payload": {"dreg": 1, "base": 1, "offset": 16, "len": 4}},
        {"lookup": {"sreg": 1, "set": "allow4_a"}},
        {"objref": {"type": 1, "name": "denied"}},
    ]


def test_a_set_id_is_left_out_a_counter_keeps_its_values_and_an_unknown_expression_its_bytes():
    counter = nx.expression("counter", u64(1, 1500), u64(2, 3), attr(3, b""))  # 3: padding
    other = nx.expression("quota", u64(1, 10), u32(2, 1))
    out = decoded(lookup("allow_dns4_b") + counter + other)
    assert out[0] == {"lookup": {"set": "allow_dns4_b", "sreg": 1, "flags": 0}}  # no set id (a batch's own)
    assert out[1] == {"counter": {"bytes": 1500, "packets": 3}}
    assert out[2] == {"quota": {"attr1": "000000000000000a", "attr2": "00000001"}}


def test_limit_and_log_are_listed_as_libnftables_lists_them():
    """As written, and as the kernel dumps them back: a log with no group gets the default level (warn),
    which libnftables does not list."""
    body = rule_exprs(*LIMIT_LOG, {"limit": {"rate": 7, "per": "day"}}, {"log": None})
    body += rule_exprs({"log": {"group": 0, "snaplen": 64, "queue-threshold": 10, "prefix": ""}})
    body += nx.expression("limit", u64(1, 3), u64(2, 60), u32(3, 5), u32(4, 0), u32(5, 1), attr(6, b""))
    body += nx.expression("log", strz(2, "x"), u32(5, 4)) + nx.expression("log", u32(5, 4))
    assert decoded(body) == [
        *LIMIT_LOG,
        {"limit": {"rate": 7, "burst": 5, "per": "day"}},  # the burst libnftables sent
        {"log": None},
        {"log": {"prefix": "", "group": 0, "snaplen": 64, "queue-threshold": 10}},
        {"limit": {"rate": 3, "burst": 5, "per": "minute", "inv": True}},  # `over`; 6: padding
        {"log": {"prefix": "x"}},
        {"log": None},
    ]


def test_a_limit_or_log_of_another_form_keeps_its_bytes():
    limit = (u64(1, 10240), u64(2, 1), u32(3, 0), u32(4, 1), u32(5, 0))  # bytes
    odd = [
        nx.expression("limit", *limit),
        nx.expression("limit", u64(1, 3), u64(2, 604800), u32(3, 5), u32(4, 0), u32(5, 0)),  # per week
        nx.expression("limit", u64(1, 3), u64(2, 1), u32(4, 0), u32(5, 0)),  # no burst
        nx.expression("log", u32(5, 7), u32(6, 0x2F)),  # level debug, flags all
        nx.expression("log", u32(5, 4), u32(6, 1)),  # flags
        nx.expression("log", attr(2, b"\xff\0"), attr(1, b"\0\x02")),  # not UTF-8
        nx.expression("log", attr(1, b"\0\x02"), u32(5, 4)),  # a group and a level
        nx.expression("log", attr(1, b"\0\x02\0")),  # a group of 3 bytes
    ]
    got = decoded(b"".join(odd))
    assert got[0] == {
        "limit": {"attr1": "0000000000002800", "attr2": "0000000000000001", "attr3": "00000000",
                  "attr4": "00000001", "attr5": "00000000"}
    }  # fmt: skip
    assert got[3] == {"log": {"attr5": "00000007", "attr6": "0000002f"}}
    assert [next(iter(e)) for e in got] == ["limit"] * 3 + ["log"] * 5
    assert all(set(next(iter(e.values()))) <= {f"attr{i}" for i in range(1, 7)} for e in got), got


def elements_body(*elems: bytes, name: str = "s") -> memoryview:
    return memoryview(strz(1, TABLE) + strz(2, name) + nested(3, b"".join(elems)))


def interval_set(ranges, version: int, first_zero: bool = True, reverse: bool = False):
    size = 4 if version == 4 else 16
    elems, _ = nx.interval_elements(ranges, size, False, first_zero)
    rows = element_rows([elements_body(*(reversed(elems) if reverse else elems))])
    kind = nx.TYPE_IPADDR if version == 4 else nx.TYPE_IP6ADDR
    return set_item({"name": "allow4_a", "flags": nx.NFT_SET_INTERVAL, "type": kind, "key_len": size}, rows)


@pytest.mark.parametrize("reverse", [False, True], ids=["ascending", "descending"])
def test_interval_elements_come_back_as_addresses_prefixes_and_ranges(reverse):
    ranges = [
        (a("10.0.0.0"), a("10.255.255.255")),  # a prefix
        (a("192.0.2.7"), a("192.0.2.7")),  # one address
        (a("198.51.100.3"), a("198.51.100.9")),  # a range
        (a("203.0.113.0"), a("203.0.113.127")),  # adjacent to the next, not merged
        (a("203.0.113.128"), a("203.0.113.255")),
        (a("240.0.0.0"), a("255.255.255.255")),  # up to the top: no end element
    ]
    got = interval_set(ranges, 4, reverse=reverse)
    assert got["elem"] == [
        {"prefix": {"addr": "10.0.0.0", "len": 8}},
        "192.0.2.7",
        {"range": ["198.51.100.3", "198.51.100.9"]},
        {"prefix": {"addr": "203.0.113.0", "len": 25}},
        {"prefix": {"addr": "203.0.113.128", "len": 25}},
        {"prefix": {"addr": "240.0.0.0", "len": 4}},
    ]
    assert got["flags"] == ["interval"] and got["type"] == "ipv4_addr"


def test_ipv6_intervals_from_zero_and_everything():
    top = (1 << 128) - 1
    assert interval_set([(0, (1 << 32) - 1)], 6)["elem"] == [{"prefix": {"addr": "::", "len": 96}}]
    assert interval_set([(0, top)], 6, first_zero=False)["elem"] == [{"prefix": {"addr": "::", "len": 0}}]
    mapped = (0xFFFF << 32, (0xFFFF << 32) + (1 << 32) - 1)  # written as render writes it (inet_ntop)
    assert interval_set([mapped], 6)["elem"] == [{"prefix": {"addr": "::ffff:0.0.0.0", "len": 96}}]


def test_plain_elements_with_timeouts_and_keys_that_are_not_addresses():
    timed = element(bytes([192, 0, 2, 9]), timeout_ms=30_000)
    expiring = nested(1, nx.data_value(1, bytes([192, 0, 2, 1])) + u64(4, 60_000) + u64(5, 59_400))
    rows = element_rows([elements_body(timed, expiring), elements_body(element(bytes([192, 0, 2, 3])))])
    got = set_item({"name": "learned4", "flags": 0x10, "type": nx.TYPE_IPADDR, "key_len": 4}, rows)
    assert got["elem"] == [
        {"elem": {"val": "192.0.2.1", "timeout": 60, "expires": 59}},
        "192.0.2.3",
        {"elem": {"val": "192.0.2.9", "timeout": 30}},
    ]
    assert got["flags"] == ["timeout"]
    ports = set_item(
        {"flags": 0, "type": 13, "key_len": 2}, element_rows([elements_body(element(b"\0\x35"))])
    )
    catchall = element_rows([elements_body(nested(1, u32(3, 2)))])  # NFT_SET_ELEM_CATCHALL: no key
    assert ports["elem"] == ["0035"] and ports["type"] == 13
    assert set_item({"flags": 0, "type": 13, "key_len": 2}, catchall)["elem"] == ["*"]


def chain_body(name: str, table: str = TABLE, hook: bytes = b"", handle: int = 2) -> bytes:
    return strz(1, table) + u64(2, handle) + strz(3, name) + hook + u32(6, 1)  # 6: use, a reference count


def base_hook(dev: str, both: bool = True) -> bytes:
    devs = nested(4, strz(1, dev)) if both else b""
    return (
        nested(4, u32(1, 0) + u32(2, -500) + strz(3, dev) + devs) + u32(5, 1) + strz(7, "filter") + u32(10, 1)
    )


@pytest.mark.parametrize("both", [True, False], ids=["dev-and-devs (6.18)", "dev (6.1)"])
def test_a_base_chain_lists_its_hook_and_one_device_as_dev(both):
    got = chain_item(memoryview(chain_body("ingress", hook=base_hook("veth-a", both))), "netdev")
    assert got == {
        "family": "netdev", "table": TABLE, "handle": 2, "name": "ingress", "hook": "ingress", "prio": -500,
        "dev": "veth-a", "policy": "accept", "type": "filter", "flags": 1,
    }  # fmt: skip
    assert "dev" not in neutral_listing([{"chain": got}])[0]["chain"]


def test_an_objects_attributes_unknown_here_are_left_out():
    plain = strz(1, TABLE) + strz(2, "denied") + u32(3, 1) + nested(4, u64(1, 10) + u64(2, 1)) + u64(6, 9)
    counter = object_item(memoryview(plain + u32(5, 2) + u32(99, 7)), "netdev")
    assert counter == {
        "counter": {
            "family": "netdev",
            "table": TABLE,
            "name": "denied",
            "handle": 9,
            "bytes": 10,
            "packets": 1,
        }
    }
    quota = object_item(
        memoryview(strz(1, TABLE) + strz(2, "q") + u32(3, 2) + nested(4, u64(1, 5))), "netdev"
    )
    assert quota == {
        "object": {"family": "netdev", "table": TABLE, "name": "q", "type": 2, "data": u64(1, 5).hex()}
    }


# --- a fake kernel and whole reads ------------------------------------------------------------------------


def message(kind: int, seq: int, body: bytes, family: int = 5, flags: int = 2) -> bytes:
    payload = struct.pack("=BBH", family, 0, 0) + body
    raw = NLMSGHDR.pack(NLMSGHDR.size + len(payload), (10 << 8) | kind, flags, seq, 0) + payload
    return raw + b"\0" * (-len(raw) % 4)


def error(seq: int, code: int) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + 4, 2, 0, seq, 0) + struct.pack("=i", -code)


def done(seq: int) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + 4, 3, 2, seq, 0) + b"\0" * 4


class FakeKernel:
    """Tables of nf_tables messages, answered as the kernel answers (see the module's doc)."""

    def __init__(self) -> None:
        self.tables: dict[str, int] = {}  # name -> use count
        self.chains: list[tuple[str, str, bytes]] = []
        self.rules: list[tuple[str, bytes]] = []
        self.sets: list[tuple[str, str, bytes]] = []
        self.elements: dict[tuple[str, str], bytes] = {}
        self.objects: list[tuple[str, bytes]] = []
        self.gen = 100
        self.on_request = lambda kind: None  # a hook: another writer, between two requests
        self.requests: list[int] = []
        self.out: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        _, kind, flags, seq, _ = NLMSGHDR.unpack_from(data)
        kind &= 0xFF
        self.requests.append(kind)
        self.on_request(kind)
        a = attributes(memoryview(data)[NLMSGHDR.size + 4 :], (1, 2, 3))
        name = lambda k: bytes(a[k]).rstrip(b"\0").decode() if k in a else None  # noqa: E731
        table = name(1)
        if kind == 16:
            return self.out.append(message(15, seq, u32(1, self.gen), family=0, flags=0))
        if kind == 1:
            body = (
                strz(1, table) + u32(2, 0) + u32(3, self.tables[table]) + u64(4, 7)
                if table in self.tables
                else None
            )
            return self.out.append(message(0, seq, body, flags=0) if body else error(seq, errno.ENOENT))
        if kind == 4 and not flags & 0x300:
            found = [b for t, n, b in self.chains if (t, n) == (table, name(3))]
            return self.out.append(message(3, seq, found[0], flags=0) if found else error(seq, errno.ENOENT))
        if kind == 13:
            body = self.elements.get((table, name(2)))
            return self.out.append((message(12, seq, body) if body else b"") + done(seq))
        if kind != 4 and table not in self.tables:
            return self.out.append(error(seq, errno.ENOENT))
        rows = {4: [(3, b) for _, _, b in self.chains]}.get(kind) or [  # the chain dump is not filtered
            (k, b) for k, rows in ((6, self.rules), (9, self.sets), (18, self.objects)) if k == kind - 1
            for t, *rest in rows if t == table for b in rest[-1:]
        ]  # fmt: skip
        self.out.append(b"".join(message(k, seq, b) for k, b in rows) + done(seq))

    def recv(self, size: int) -> bytes:
        return self.out.pop(0)

    def close(self) -> None:
        pass


def host_table(
    k: FakeKernel, table: str = TABLE, variant: str = "a", dev: str = "veth-a", fp: str = FP
) -> None:
    """A small host-side table: the fingerprint, the ingress hook, decide and deny, two named sets (one
    interval, one plain), an anonymous set, the named counter."""
    d, n = f"decide_{variant}", f"deny_{variant}"
    k.chains += [
        (table, "fingerprint", chain_body("fingerprint", table)),
        (table, "ingress", chain_body("ingress", table, base_hook(dev))),
    ]
    k.chains += [(table, n, chain_body(n, table, handle=30)), (table, d, chain_body(d, table, handle=31))]
    ip4 = {"payload": {"protocol": "ip", "field": "daddr"}}
    rules = [
        ("fingerprint", rule_exprs({"return": None}), attr(7, nx.udata(0, fp.encode() + b"\0"))),
        ("ingress", rule_exprs({"jump": {"target": d}}), b""),
        (n, rule_exprs({"counter": "denied"}, {"accept": None}), b""),
        (d, rule_exprs({"match": {"op": "==", "left": ip4, "right": f"@allow4_{variant}"}}, {"accept": None}), b""),
        (d, rule_exprs({"match": {"op": "==", "left": ip4, "right": f"@allow_dns4_{variant}"}}, {"accept": None}), b""),
        (d, nx.expression("meta", u32(2, 16), u32(1, 1)) + lookup("__set0") + rule_exprs({"jump": {"target": n}}), b""),
    ]  # fmt: skip
    for i, (chain, exprs, udata) in enumerate(rules):
        k.rules.append(
            (table, strz(1, table) + strz(2, chain) + u64(3, 50 + i) + nested(4, exprs) + udata + u32(9, i))
        )
    sets = [
        (f"allow4_{variant}", nx.NFT_SET_INTERVAL, [element(b"\0" * 4, 1), element(bytes([198, 51, 100, 10])), element(bytes([198, 51, 100, 11]), 1)]),
        (f"allow_dns4_{variant}", 0, [element(bytes([192, 0, 2, 1]))]),
        ("__set0", nx.NFT_SET_ANONYMOUS | nx.NFT_SET_CONSTANT, [element(b"\x06"), element(b"\x11")]),
    ]  # fmt: skip
    for i, (name, flags, elems) in enumerate(sets):
        kind, size = (nx.TYPE_IPADDR, 4) if not name.startswith("__") else (12, 1)
        body = strz(1, table) + strz(2, name) + u32(3, flags) + u32(4, kind) + u32(5, size) + u64(16, 60 + i)
        k.sets.append((table, name, body + u32(20, len(elems)) + strz(19, "0xffffffff82508920")))
        k.elements[table, name] = strz(1, table) + strz(2, name) + nested(3, b"".join(elems))
    k.objects.append(
        (table, strz(1, table) + strz(2, "denied") + u32(3, 1) + nested(4, u64(1, 0) + u64(2, 0)) + u64(6, 1))
    )
    k.tables[table] = 4 + 2 + 1  # chains, named sets, objects (the bound anonymous set is not counted)


def read(k: FakeKernel, table: str = TABLE):
    return ListingSocket(k).read(table, "netdev", ("ingress", "fingerprint"))


def test_a_missing_table_reads_none_after_one_request_for_it():
    k = FakeKernel()
    assert read(k) is None
    assert k.requests == [16, 1, 16]  # the generation, the table, the generation


def test_a_table_reads_whole_with_the_answers_libnftables_would_give():
    k = FakeKernel()
    host_table(k)
    host_table(k, "egressd_iother", dev="veth-b")  # another table in the namespace: none of it leaks in
    listing = read(k)
    kinds = [next(iter(i)) for i in listing]
    assert kinds == ["table", "set", "set", "counter", "chain", "chain", "chain", "chain", *["rule"] * 6]
    assert [i["chain"]["name"] for i in listing if "chain" in i] == [
        "decide_a",
        "deny_a",
        "fingerprint",
        "ingress",
    ]
    assert all(next(iter(i.values())).get("table", TABLE) == TABLE for i in listing)
    assert fingerprint_of(listing) == FP and active_variant(listing) == "a"
    assert set_elements(listing, ["allow_dns4"]) == {"allow_dns4": frozenset({"192.0.2.1"})}
    allow = next(i["set"] for i in listing if i.get("set", {}).get("name") == "allow4_a")
    assert allow["elem"] == ["198.51.100.10"] and "attr20" not in allow  # the element count is left out
    exprs = [e for i in listing if "rule" in i for e in i["rule"]["expr"]]
    anon = [e["lookup"]["set"] for e in exprs if isinstance(e.get("lookup", {}).get("set"), dict)]
    assert anon == [{"flags": ["anonymous", "constant"], "type": 12, "key_len": 1, "elem": ["06", "11"]}]
    target = Target("netdev", TABLE, ())
    assert retire_commands(listing, "a", target) == [
        {"flush": {"chain": {"family": "netdev", "table": TABLE, "name": "decide_a"}}},
        {"flush": {"chain": {"family": "netdev", "table": TABLE, "name": "deny_a"}}},
        {"delete": {"chain": {"family": "netdev", "table": TABLE, "name": "decide_a"}}},
        {"delete": {"chain": {"family": "netdev", "table": TABLE, "name": "deny_a"}}},
        {"delete": {"set": {"family": "netdev", "table": TABLE, "name": "allow4_a"}}},
        {"delete": {"set": {"family": "netdev", "table": TABLE, "name": "allow_dns4_a"}}},
    ]
    assert k.requests.count(4) == 4 and k.requests.count(13) == 3  # chains one by one, each set's elements


def test_two_tables_of_one_policy_digest_alike_whatever_the_interface_variant_and_handles():
    k = FakeKernel()
    host_table(k)
    host_table(k, "egressd_iother", variant="b", dev="veth-b")
    first, second = neutral_listing(read(k)), neutral_listing(read(k, "egressd_iother"))
    assert first != second and listing_digest(first) == listing_digest(second)
    assert active_variant(second) == "b"


def log_chain(k: FakeKernel, table: str = TABLE, variant: str = "a", **change) -> None:
    """A step's logging chain in the table (limit, log, goto deny), as the raw writer writes it."""
    chain, limit, log = f"log_deny_out_{variant}", dict(LIMIT_LOG[0]["limit"]), dict(LIMIT_LOG[1]["log"])
    limit.update({k: v for k, v in change.items() if k in limit})
    log.update({k: v for k, v in change.items() if k in log})
    stmts = ({"limit": limit}, {"log": log}, {"goto": {"target": f"deny_{variant}"}})
    k.chains.append((table, chain, chain_body(chain, table, handle=32)))
    k.rules.append((table, strz(1, table) + strz(2, chain) + u64(3, 70) + nested(4, rule_exprs(*stmts))))
    k.tables[table] += 1


@pytest.mark.parametrize(
    "change", [{"rate": 51}, {"burst": 101}, {"per": "minute"}, {"prefix": "deny_oux"}, {"group": 3}]
)
def test_a_table_with_a_logging_chain_digests_alike_and_a_change_to_it_does_not(change):
    k = FakeKernel()
    for table, variant, dev in ((TABLE, "a", "veth-a"), ("egressd_iother", "b", "veth-b")):
        host_table(k, table, variant, dev)
        log_chain(k, table, variant)
    host_table(k, "egressd_ichanged", dev="veth-c")
    log_chain(k, "egressd_ichanged", **change)
    first, second = neutral_listing(read(k)), neutral_listing(read(k, "egressd_iother"))
    rules = [i["rule"]["expr"] for i in first if i.get("rule", {}).get("chain") == "log_deny_out_a"]
    assert rules == [list(LIMIT_LOG)]
    assert listing_digest(first) == listing_digest(second)  # adopted: the same policy, variant a or b
    changed = neutral_listing(read(k, "egressd_ichanged"))
    assert fingerprint_of(changed) == FP and listing_digest(changed) != listing_digest(first)


def test_an_empty_chain_nothing_jumps_to_is_found_by_the_use_count():
    k = FakeKernel()
    host_table(k)
    k.chains.insert(0, ("egressd_iother", "elsewhere", chain_body("elsewhere", "egressd_iother")))
    before = listing_digest(read(k))
    k.chains.append((TABLE, "planted", chain_body("planted")))
    k.tables[TABLE] += 1
    listing = read(k)
    assert [i["chain"]["name"] for i in listing if "chain" in i] == [
        "decide_a",
        "deny_a",
        "fingerprint",
        "ingress",
        "planted",
    ]
    assert listing_digest(listing) != before and "uncounted" not in str(listing)
    k.tables[TABLE] += 1  # something the listing cannot name (a flowtable): the listing says so
    assert read(k)[-1] == {"uncounted": {"objects": 1}}


def test_a_read_during_a_change_is_done_again_and_one_that_never_settles_fails():
    k = FakeKernel()
    host_table(k)
    changes = iter([True, False])

    def writer(kind):
        if kind == 7 and next(changes, False):
            k.gen += 1

    k.on_request = writer
    assert fingerprint_of(read(k)) == FP and k.requests.count(1) == 2
    k.on_request = lambda kind: setattr(k, "gen", k.gen + 1) if kind == 7 else None
    with pytest.raises(NetlinkError, match="changed during each of 8 reads"):
        read(k)


def test_a_malformed_object_is_a_netlink_error():
    k = FakeKernel()
    host_table(k)
    k.rules.append((TABLE, strz(1, TABLE) + strz(2, "ingress") + nested(4, nested(1, strz(2, "x")))))
    with pytest.raises(NetlinkError, match="malformed"):
        read(k)


# --- HostBackend ------------------------------------------------------------------------------------------


class NoNft:
    def host_cmd(self, cmd):
        raise AssertionError(f"libnftables must not be asked: {cmd}")


def test_host_reads_go_raw_keep_their_sockets_and_name_every_table_alike(monkeypatch):
    k = FakeKernel()
    made = []
    monkeypatch.setattr(ListingSocket, "open", classmethod(lambda cls: made.append(1) or cls(k)))
    host_table(k, table_name("veth-a"))
    hb = HostBackend(NoNft(), Config())
    listing = hb.read("veth-a")
    assert listing[0]["table"]["name"] == "egressd_host_side" and fingerprint_of(listing) == FP
    assert hb.read("veth-b") is None and len(made) == 1  # the socket was kept and used again


def test_a_raw_read_that_fails_is_an_apply_error_not_a_libnftables_listing(monkeypatch):
    class Broken(FakeKernel):
        def sendall(self, data):
            raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(ListingSocket, "open", classmethod(lambda cls: cls(Broken())))
    with pytest.raises(ApplyError, match="cannot read the host-side table for veth-a over raw netlink"):
        HostBackend(NoNft(), Config()).read("veth-a")


def test_without_raw_netlink_reads_go_through_libnftables():
    class Nft:
        def host_cmd(self, cmd):
            assert cmd == {
                "nftables": [{"list": {"table": {"family": "netdev", "name": table_name("veth-a")}}}]
            }
            return 0, {"nftables": [{"table": {"family": "netdev", "name": table_name("veth-a")}}]}, ""

    listing = HostBackend(Nft(), Config(), raw=False).read("veth-a")
    assert listing == [{"table": {"family": "netdev", "name": "egressd_host_side"}}]


def test_elements_differ_reads_the_raw_interval_forms():
    policy = parse_sandbox(
        {"id": "x", "network_policy": {"allow_out": ["198.51.100.10", "198.51.100.64/26"]}}
    ).policy
    ruleset = render(policy, Config(), host=True)
    have = {name: elems for name, elems in ruleset.elements().items()}
    listing = [{"set": {"name": f"{n}_a", "elem": e}} for n, e in have.items()]
    assert elements_differ(listing, ruleset) is None
    raw = interval_set(
        [(a("198.51.100.10"), a("198.51.100.10")), (a("198.51.100.64"), a("198.51.100.127"))], 4
    )
    assert raw["elem"] == have["allow4"]
    extra = interval_set(
        [(a("198.51.100.10"), a("198.51.100.11")), (a("198.51.100.64"), a("198.51.100.127"))], 4
    )
    other = [
        {"set": {**s["set"], "elem": extra["elem"]}} if s["set"]["name"] == "allow4_a" else s for s in listing
    ]
    assert elements_differ(other, ruleset) == "set allow4 holds other addresses than the policy's"
