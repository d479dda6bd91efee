"""The host-side tables read over raw netlink (kernel/nfnl_listing.py) against libnftables, on this kernel.

Every table is written by egressd's own HostBackend (raw netlink batches) in a scratch namespace with veth
ends for the ingress hooks, then read both ways: HostBackend(raw=True) and HostBackend(raw=False), whose
read is libnftables' `list table`. What the reconciler and the planner take from a listing must be the same
either way; the digest of a raw listing must be the same for one policy on two interfaces and in variant a
or b, and must change with every edit of a rule, chain, set or object, never with a counter's values.
"""

import json
import os
import shlex
import subprocess
import time

import pytest

from egressd.kernel.hostside import HostBackend, table_name, target_for
from egressd.kernel.netns import in_netns
from egressd.kernel.nfnl import attr, attributes
from egressd.kernel.nfnl_batch import BatchSocket
from egressd.kernel.nfnl_listing import GETCHAIN, GETOBJ, GETRULE, GETSET, GETTABLE, NAMED, ListingSocket
from egressd.kernel.nft import LibnftBackend, counter_of
from egressd.model.config import Config
from egressd.reconcile.sync import elements_differ, listing_digest
from egressd.ruleset.render import render
from egressd.ruleset.transactions import (
    active_variant,
    fingerprint_of,
    learned_elements,
    retire_commands,
    set_elements,
)
from tests.integration.test_nfnl_batch import CLOSED, GUARDED, LOG_CHAIN, NAMES, OPEN, RESOLVERS, policy, sh

pytestmark = pytest.mark.root

IFACES = ("egl-h0", "egl-h1")
OTHER = policy(allow_internet_access=False, allow_out=["192.0.2.77"])


class Host:
    """One scratch namespace as egressd's own: HostBackend writing and reading raw, and HostBackend reading
    with libnftables, every call made inside the namespace (what it makes there stays there)."""

    def __init__(self, ns: str, config: Config) -> None:
        self.ns, self.path = ns, f"/run/netns/{ns}"
        self.nft = LibnftBackend()
        self.raw = HostBackend(self.nft, config)
        self.lib = HostBackend(self.nft, config, raw=False)

    def __call__(self, fn):
        return in_netns(self.path, fn)[0]

    def apply(self, iface: str, ruleset, elements=None) -> None:
        self(lambda: self.raw.apply(iface, ruleset, elements))

    def reads(self, iface: str):
        """(raw listing, libnftables listing) of one interface's table."""
        return self(lambda: self.raw.read(iface)), self(lambda: self.lib.read(iface))

    def nft_cmd(self, *args: str) -> subprocess.CompletedProcess:
        return sh("ip", "netns", "exec", self.ns, "nft", *args)

    def close(self) -> None:
        self.nft.close()


@pytest.fixture
def host(netns_name):
    for i, iface in enumerate(IFACES):
        sh("ip", "-n", netns_name, "link", "add", iface, "type", "veth", "peer", "name", f"egl-p{i}")
    h = Host(netns_name, Config())
    yield h
    h.close()


def test_the_kernel_filters_rule_set_and_object_dumps_by_table_and_not_table_or_chain_dumps(host):
    """What nfnl_listing.py is built on, on this kernel (6.1's code is the same): a chain dump that names a
    table still answers with every table's chains, and the table's use count is its chains, named sets
    and objects (a bound anonymous set is not counted)."""
    for iface in IFACES:
        host.apply(iface, render(CLOSED, Config(), host=True))
    mine, other = table_name(IFACES[0]), table_name(IFACES[1])

    def dumps():
        sock = ListingSocket.open()
        named = attr(NAMED, mine.encode() + b"\0")
        out = {}
        for kind in (GETTABLE, GETCHAIN, GETRULE, GETSET, GETOBJ):
            bodies = sock.get(kind, "netdev", named) or []
            out[kind] = {bytes(attributes(b, (NAMED,))[NAMED]).rstrip(b"\0").decode() for b in bodies}
        use = sock.get(GETTABLE, "netdev", named, dump=False)[0]
        sock.close()
        return out, int.from_bytes(bytes(attributes(use, (3,))[3]), "big")

    tables, use = host(dumps)
    assert tables[GETTABLE] == tables[GETCHAIN] == {mine, other}  # not filtered
    assert tables[GETRULE] == tables[GETSET] == tables[GETOBJ] == {mine}  # filtered
    listing = host(lambda: host.lib.read(IFACES[0]))
    counted = sum(1 for i in listing if "chain" in i or "set" in i or "counter" in i)
    assert use == counted


CASES = [(CLOSED, Config()), (CLOSED, GUARDED), (NAMES, Config()), (NAMES, RESOLVERS), (OPEN, RESOLVERS)]


@pytest.mark.parametrize(
    ("pol", "config"), CASES, ids=["closed", "closed-guarded", "names", "names-resolvers", "open"]
)
def test_a_raw_listing_answers_as_the_libnftables_listing_does(host, pol, config):
    """One policy on two interfaces: in variant a on the first, in variant b on the second (written after
    another policy). Every question the reconciler and the planner ask of a listing gets the same answer
    from both listings, and the raw digest is the same for both tables."""
    host.raw.set_config(config)
    ruleset = render(pol, config, host=True)
    elements = {
        n: {"192.0.2.1", "192.0.2.2"} if n.endswith("4") else {"2001:db8::1"} for n in ruleset.dns_sets
    }
    host.apply(IFACES[0], ruleset, elements)
    host.apply(IFACES[1], render(OTHER, config, host=True))
    host.apply(IFACES[1], ruleset, elements)
    digests = []
    for iface, variant in zip(IFACES, "ab", strict=True):
        raw, lib = host.reads(iface)
        assert fingerprint_of(raw) == fingerprint_of(lib) == ruleset.fingerprint
        assert active_variant(raw) == active_variant(lib) == variant
        dns = {n: frozenset(e) for n, e in elements.items()}
        assert set_elements(raw, ruleset.dns_sets) == set_elements(lib, ruleset.dns_sets) == dns
        assert elements_differ(raw, ruleset) is None is elements_differ(lib, ruleset)
        target = target_for(iface)
        for v in "ab":
            ours, theirs = retire_commands(raw, v, target), retire_commands(lib, v, target)
            assert sorted(map(json.dumps, ours)) == sorted(map(json.dumps, theirs))
            # every chain is emptied before any is deleted: decide jumps to the logging chains, they to deny
            kinds = [next(iter(c)) for c in ours]
            assert kinds == sorted(kinds, key=["flush", "delete"].index)
        assert [i for i in raw if "uncounted" in i] == []
        digests.append(listing_digest(raw))
    assert digests[0] == digests[1]


def test_elements_differ_sees_an_address_added_to_or_removed_from_an_allow_set(host):
    ruleset = render(CLOSED, Config(), host=True)
    host.apply(IFACES[0], ruleset)
    table = table_name(IFACES[0])
    raw, _ = host.reads(IFACES[0])
    before = listing_digest(raw)
    host.nft_cmd("add", "element", "netdev", table, "allow4_a", "{ 192.0.2.99 }")
    raw, lib = host.reads(IFACES[0])
    message = "set allow4 holds other addresses than the policy's"
    assert elements_differ(raw, ruleset) == message == elements_differ(lib, ruleset)
    assert listing_digest(raw) == before  # elements are compared on their own, not in the digest
    host.nft_cmd("delete", "element", "netdev", table, "allow4_a", "{ 192.0.2.99, 198.51.100.10 }")
    raw, lib = host.reads(IFACES[0])
    assert elements_differ(raw, ruleset) == message == elements_differ(lib, ruleset)
    host.nft_cmd("add", "element", "netdev", table, "allow4_a", "{ 198.51.100.10 }")
    raw, _ = host.reads(IFACES[0])
    assert elements_differ(raw, ruleset) is None


def rule_handle(host: Host, table: str, chain: str, index: int) -> str:
    out = host.nft_cmd("-a", "-j", "list", "chain", "netdev", table, chain).stdout
    return str([i["rule"]["handle"] for i in json.loads(out)["nftables"] if "rule" in i][index])


EDITS = {
    "rule inserted": lambda h, t: h.nft_cmd("insert", "rule", "netdev", t, "decide_a", "accept"),
    "rule deleted": lambda h, t: h.nft_cmd(
        "delete", "rule", "netdev", t, "decide_a", "handle", rule_handle(h, t, "decide_a", -2)
    ),
    "rule replaced": lambda h, t: h.nft_cmd(
        "replace", "rule", "netdev", t, "decide_a", "handle", rule_handle(h, t, "decide_a", -1), "accept"
    ),
    "chain added": lambda h, t: h.nft_cmd("add", "chain", "netdev", t, "extra"),
    "base chain's policy": lambda h, t: h.nft_cmd("add", "chain", "netdev", t, "ingress", "{ policy drop; }"),
    "set added": lambda h, t: h.nft_cmd("add", "set", "netdev", t, "extra", "{ type ipv4_addr; }"),
    "set's flags": lambda h, t: (
        h.nft_cmd("delete", "set", "netdev", t, "learned4"),
        h.nft_cmd("add", "set", "netdev", t, "learned4", "{ type ipv4_addr; }"),
    ),
    "counter added": lambda h, t: h.nft_cmd("add", "counter", "netdev", t, "extra"),
    "quota added": lambda h, t: h.nft_cmd("add", "quota", "netdev", t, "extra", "{ over 1 mbytes }"),
    "table dormant": lambda h, t: h.nft_cmd("add", "table", "netdev", t, "{ flags dormant; }"),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_the_raw_digest_changes_with_every_edit(host, edit):
    ruleset = render(CLOSED, Config(), host=True)
    host.apply(IFACES[0], ruleset)
    before, _ = host.reads(IFACES[0])
    EDITS[edit](host, table_name(IFACES[0]))
    after, lib = host.reads(IFACES[0])
    assert fingerprint_of(after) == ruleset.fingerprint  # only the digest can tell
    assert listing_digest(after) != listing_digest(before)
    assert active_variant(after) == active_variant(lib)


def test_counter_values_do_not_change_the_digest(host):
    """Packets the closed policy denies, sent into the hook's interface from its veth peer: the named
    counter counts them (libnftables says so), the raw digest stays."""
    host.apply(IFACES[0], render(OTHER, Config(), host=True))
    before, _ = host.reads(IFACES[0])
    ns = host.ns
    for argv in (
        ["link", "set", "egl-h0", "up"],
        ["link", "set", "egl-p0", "up"],
        ["addr", "add", "192.0.2.2/24", "dev", "egl-p0"],
        ["neigh", "add", "192.0.2.1", "lladdr", "02:00:00:00:00:01", "dev", "egl-p0", "nud", "permanent"],
    ):
        sh("ip", "-n", ns, *argv)
    sent = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    sent += "for _ in range(5): s.sendto(b'x', ('192.0.2.1', 9))\n"
    sh("ip", "netns", "exec", ns, "python3", "-c", sent)
    deadline = time.monotonic() + 5
    while (counter_of(host.reads(IFACES[0])[1], "denied") or (0, 0))[0] < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    after, lib = host.reads(IFACES[0])
    assert (counter_of(lib, "denied") or (0, 0))[0] >= 5, "the packets must be counted"
    assert after != before and listing_digest(after) == listing_digest(before)
    host.nft_cmd("reset", "counters", "table", "netdev", table_name(IFACES[0]))
    assert listing_digest(host.reads(IFACES[0])[0]) == listing_digest(before)


def log_rule(host: Host) -> tuple[dict, dict]:
    """The logging chain's rule as read raw and by libnftables."""
    raw, lib = host.reads(IFACES[0])

    def rule(listing: list[dict]) -> dict:
        return next(i["rule"] for i in listing if i.get("rule", {}).get("chain") == LOG_CHAIN)

    return rule(raw), rule(lib)


def test_a_logging_chain_reads_raw_as_libnftables_lists_it_and_only_an_edit_changes_its_digest(host):
    """A step's logging chain (limit, log, goto deny), written raw, that every packet goes through first:
    its rule reads raw as libnftables lists it; packets (the limit's tokens taken, some logged) leave the
    digest as it was; a changed rate, burst, prefix or group changes it."""
    ruleset = render(OTHER, Config(), host=True)
    host.apply(IFACES[0], ruleset)
    table = table_name(IFACES[0])
    t = {"family": "netdev", "table": table}
    stmts = [
        {"limit": {"rate": 1, "burst": 2, "per": "second"}},
        {"log": {"prefix": "deny_out", "group": 2}},
        {"goto": {"target": "deny_a"}},
    ]
    sock = BatchSocket.open(host.path)
    try:
        sock.run([{"add": {"chain": {**t, "name": LOG_CHAIN}}},
                  {"add": {"rule": {**t, "chain": LOG_CHAIN, "expr": stmts}}}], "logging chain")  # fmt: skip
    finally:
        sock.close()
    host.nft_cmd("insert", "rule", "netdev", table, "ingress", "goto", LOG_CHAIN)
    raw, lib = log_rule(host)
    assert raw["expr"] == lib["expr"] == stmts
    before = host.reads(IFACES[0])[0]
    assert fingerprint_of(before) == ruleset.fingerprint
    for argv in (
        ["link", "set", "egl-h0", "up"],
        ["link", "set", "egl-p0", "up"],
        ["addr", "add", "192.0.2.2/24", "dev", "egl-p0"],
        ["neigh", "add", "192.0.2.1", "lladdr", "02:00:00:00:00:01", "dev", "egl-p0", "nud", "permanent"],
    ):
        sh("ip", "-n", host.ns, *argv)
    sent = "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
    sent += "for _ in range(5): s.sendto(b'x', ('192.0.2.1', 9))\n"
    sh("ip", "netns", "exec", host.ns, "python3", "-c", sent)
    deadline = time.monotonic() + 5
    while (counter_of(host.reads(IFACES[0])[1], "denied") or (0, 0))[0] < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    after, lib = host.reads(IFACES[0])
    # Under the limit a packet is logged and goes to deny (counted); over it, on to the ingress's next rule.
    assert (counter_of(lib, "denied") or (0, 0))[0] >= 1, "the packets must have gone through the chain"
    assert listing_digest(after) == listing_digest(before)
    digests = {listing_digest(before)}
    for edit in (
        "limit rate 2/second burst 2 packets log prefix deny_out group 2 goto deny_a",
        "limit rate 2/second burst 3 packets log prefix deny_out group 2 goto deny_a",
        'limit rate 2/second burst 3 packets log prefix "guard.deny" group 2 goto deny_a',
        'limit rate 2/second burst 3 packets log prefix "guard.deny" group 3 goto deny_a',
    ):
        handle = rule_handle(host, table, LOG_CHAIN, 0)
        host.nft_cmd("replace", "rule", "netdev", table, LOG_CHAIN, "handle", handle, *shlex.split(edit))
        raw, lib = log_rule(host)
        assert raw["expr"] == lib["expr"]
        listing = host.reads(IFACES[0])[0]
        assert fingerprint_of(listing) == ruleset.fingerprint  # only the digest can tell
        digests.add(listing_digest(listing))
    assert len(digests) == 5


def test_learned_addresses_and_a_table_that_is_gone(host):
    ruleset = render(NAMES, Config(), host=True)
    host.apply(IFACES[0], ruleset)
    host(lambda: host.raw.learn(IFACES[0], {"198.51.100.1": 30, "2001:db8:5::1": 60}))
    raw, lib = host.reads(IFACES[0])
    assert learned_elements(raw).keys() == learned_elements(lib).keys() == {"198.51.100.1", "2001:db8:5::1"}
    assert all(abs(learned_elements(lib)[k] - v) <= 1 for k, v in learned_elements(raw).items())
    learned6 = next(i["set"]["elem"] for i in raw if i.get("set", {}).get("name") == "learned6")
    assert learned6[0]["elem"]["timeout"] == 60 and 0 < learned6[0]["elem"]["expires"] <= 60
    assert host(lambda: host.raw.remove(IFACES[0]))
    assert host.reads(IFACES[0]) == (None, None)
    assert host.reads(IFACES[1]) == (None, None)  # never written


def test_a_table_read_among_hundreds_of_others(host, capsys):
    """Not asserted (a shared machine): printed, the raw read against libnftables' with 300 other
    host-side tables in the namespace."""
    n = 300
    links = "".join(f"link add egx{i} type veth peer name egy{i}\n" for i in range(n))
    subprocess.run(["ip", "-n", host.ns, "-batch", "-"], input=links, text=True, check=True, timeout=120)
    ruleset = render(NAMES, Config(), host=True)
    for i in range(n):
        host.apply(f"egx{i}", ruleset)
    host.apply(IFACES[0], ruleset)

    def timed(read):
        t0 = time.perf_counter()
        for _ in range(20):
            read(IFACES[0])
        return (time.perf_counter() - t0) / 20 * 1000

    raw_ms, lib_ms = host(lambda: timed(host.raw.read)), host(lambda: timed(host.lib.read))
    with capsys.disabled():
        print(
            f"\nread of one host-side table among {n + 1}: raw {raw_ms:.2f} ms, libnftables {lib_ms:.2f} ms"
        )
    assert listing_digest(host.reads(IFACES[0])[0]) == listing_digest(host.reads(f"egx{n - 1}")[0])
    assert os.path.exists(host.path)
