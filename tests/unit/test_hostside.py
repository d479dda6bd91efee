"""The host-side tables without root: what is rendered, and the reconciler driving a fake host backend."""

import asyncio
import random

from egressd.kernel.backend import ApplyError
from egressd.kernel.fake import FakeBackend
from egressd.kernel.hostside import (
    GUARD_TABLE,
    HostBackend,
    guard_commands,
    neutral_listing,
    table_name,
    target_for,
)
from egressd.model.config import Config, config_from_dict
from egressd.model.sandbox import DENY_ALL, PolicyError, parse_sandbox
from egressd.reconcile.reconciler import Reconciler
from egressd.reconcile.restart import export_state, restore_state
from egressd.reconcile.sync import listing_digest
from egressd.ruleset.render import render
from egressd.ruleset.transactions import replace_table
from egressd.ruleset.variants import create_commands
from tests.unit.test_reconcile import CONFIG, settle


def host_ruleset(config=None, **np):
    return render(parse_sandbox({"id": "x", "network_policy": np}).policy, config or Config(), host=True)


def test_the_host_ruleset_is_the_same_decision_judged_at_ingress():
    netns = render(parse_sandbox({"id": "x"}).policy, Config())
    host = host_ruleset()
    text = str(host.variant)
    assert "oifname" not in text and "'direction'" not in text  # no loopback, no conntrack at ingress
    assert "fe80::" in text and "ff02::" in text  # neighbour discovery only towards the link
    assert "reject" not in text and "'mangle'" in text  # a deny marks; the guard table drops
    assert host.hooks == [
        {"add": {"rule": {"family": "inet", "table": "egressd", "chain": "ingress",
                          "expr": [{"jump": {"target": "decide"}}]}}}
    ]  # fmt: skip
    # no marks, no logging chains (the host side only marks what it denies)
    logging = {n for n in netns.chains if n.startswith("log_")}
    assert host.fingerprint != netns.fingerprint and host.names == netns.names - {"admit"} - logging
    marked = host_ruleset(config_from_dict({"enforce": {"host_mark": 0x40}}))
    assert "64" in str(marked.variant) and marked.fingerprint != host.fingerprint


def test_the_host_table_is_a_netdev_table_on_the_interface_ingress_hook():
    commands = create_commands(host_ruleset(), "a", target_for("veth-7"))
    tables = {
        (c["add"]["table"]["family"], c["add"]["table"]["name"]) for c in commands if "table" in c["add"]
    }
    assert tables == {("netdev", table_name("veth-7"))}
    base = [c["add"]["chain"] for c in commands if "hook" in c["add"].get("chain", {})]
    assert base == [{"family": "netdev", "table": table_name("veth-7"), "name": "ingress", "type": "filter",
                     "hook": "ingress", "dev": "veth-7", "prio": -500, "policy": "accept"}]  # fmt: skip
    assert all(c.get("add", c.get("create", {})).get(k, {}).get("family", "netdev") == "netdev"
               for c in commands for k in ("rule", "set", "chain", "counter"))  # fmt: skip
    assert table_name("veth-7") != table_name("veth-8") and len(table_name("x" * 15)) < 32


def test_the_guard_drops_marked_packets_unless_replies_or_local_neighbour_discovery():
    cmds = guard_commands(0x100000)
    assert cmds[:3] == [
        {"add": {"table": {"family": "inet", "name": GUARD_TABLE}}},
        {"delete": {"table": {"family": "inet", "name": GUARD_TABLE}}},
        {"add": {"table": {"family": "inet", "name": GUARD_TABLE}}},
    ]  # replaced whole, in one transaction
    chain = cmds[3]["add"]["chain"]
    assert (chain["hook"], chain["prio"]) == ("prerouting", -150)  # after conntrack, before DNAT
    rules = [c["add"]["rule"]["expr"] for c in cmds[4:]]
    assert rules[0][-1] == {"accept": None}  # unmarked: untouched
    assert {"ct": {"key": "direction"}} in [m["match"]["left"] for m in rules[1] if "match" in m]
    assert rules[-1][-1] == {"drop": None}
    assert str(0xFFFFFFFF ^ 0x100000) in str(rules[1])  # the mark is cleared on what passes


def test_listings_of_one_policy_digest_the_same_whatever_the_interface():
    ruleset = host_ruleset(allow_internet_access=False, allow_out=["192.0.2.0/24"])

    def listing(iface):
        cmds = replace_table(ruleset, None, target_for(iface))["nftables"][2:]
        out = [next(iter(c["add"].values())) for c in cmds]
        return [
            {next(iter(c["add"])): {**o, "handle": i}} for i, (c, o) in enumerate(zip(cmds, out, strict=True))
        ]

    a, b = neutral_listing(listing("veth-a")), neutral_listing(listing("veth-b"))
    assert listing_digest(a) == listing_digest(b)
    assert "veth-a" not in str(a) and table_name("veth-a") not in str(a)


# --- the reconciler with a fake host backend -------------------------------------------------------------


def run(scenario, netns=("a", "b"), host=None):
    backend = FakeBackend(namespaces={f"/run/netns/{n}" for n in netns})
    host = host or FakeBackend(namespaces={"veth-a", "veth-b", "veth-c"}, host_side=True)

    async def main():
        r = Reconciler(backend, CONFIG, rng=random.Random(1), host_backend=host)
        r.start()
        try:
            return await asyncio.wait_for(scenario(r, backend, host), 10)
        finally:
            await r.stop()

    return asyncio.run(main())


def record(sid, iface, netns=True, rev=None, **np):
    r = {"id": sid, "revision": rev, "host_interface": iface, "network_policy": np}
    if netns:
        r["netns"] = f"/run/netns/{sid}"
    return parse_sandbox(r)


def test_both_tables_are_written_the_host_side_first_and_removed_together():
    async def scenario(r, fb, host):
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        assert await r.wait_enforced("a", None, 5)
        assert host.fingerprint("veth-a") == host_ruleset(allow_internet_access=False).fingerprint
        assert host.writes[0][0] == "apply" and fb.writes[0][0] == "apply"
        assert r.status["a"].writes == 2 and r.counters["host_applied"] == 1
        r.upsert(record("a", "veth-a", allow_internet_access=False))  # unchanged: costs nothing
        r.resync()
        await settle(r)
        assert len(host.writes) == 1 and len(fb.writes) == 1
        r.delete("a")
        await settle(r)
        assert host.tables == {} and fb.tables == {}

    run(scenario)


def test_the_host_side_holds_before_the_namespace_exists():
    async def scenario(r, fb, host):
        r.upsert(record("z", "veth-c", allow_internet_access=False))
        await settle(r)
        assert "veth-c" in host.tables and r.status["z"].state == "pending"

    run(scenario)


def test_dropping_or_moving_the_interface_removes_the_old_table():
    async def scenario(r, fb, host):
        r.upsert(record("a", "veth-a"))
        await settle(r)
        r.upsert(record("a", "veth-b"))
        await settle(r)
        assert set(host.tables) == {"veth-b"}
        r.upsert(record("a", None))
        await settle(r)
        assert host.tables == {} and "/run/netns/a" in fb.tables

    run(scenario)


def test_an_interface_belongs_to_one_sandbox_only():
    async def scenario(r, fb, host):
        r.upsert(record("a", "veth-a"))
        assert not r.upsert(record("b", "veth-a"))
        await settle(r)
        assert "already used by sandbox 'a'" in r.status["b"].error
        assert r.desired["b"].policy == DENY_ALL and r.desired["b"].host_interface is None

    run(scenario)


def test_an_invalid_first_record_closes_the_host_side_too():
    async def scenario(r, fb, host):
        r.reject(PolicyError(["bad entry"], "a", "/run/netns/a", 1, "veth-a"))
        await settle(r)
        closed = render(DENY_ALL, CONFIG, host=True)
        assert host.fingerprint("veth-a") == closed.fingerprint

    run(scenario)


def test_a_tampered_host_table_is_repaired_on_resync():
    async def scenario(r, fb, host):
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        await settle(r)
        del host.tables["veth-a"]  # `nft flush ruleset` on the host
        r.resync()
        await settle(r)
        assert r.counters["host_repaired"] == 1 and "veth-a" in host.tables

    run(scenario)


def test_a_failing_host_side_is_an_error_and_retried():
    attempts = []

    def fail(where, op):
        if where == "veth-a" and op == "apply" and len(attempts) < 2:
            attempts.append(op)
            return ApplyError("injected")
        return None

    host = FakeBackend(namespaces={"veth-a"}, fail=fail, host_side=True)

    async def scenario(r, fb, host):
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        assert await r.wait_enforced("a", None, 5)
        assert len(attempts) == 2 and r.counters["host_failed"] == 2 and "veth-a" in host.tables

    run(scenario, host=host)


def test_state_keeps_the_interface_and_a_restart_writes_nothing_and_prunes_the_gone():
    fb = FakeBackend(namespaces={"/run/netns/a", "/run/netns/b"})
    host = FakeBackend(namespaces={"veth-a", "veth-b"}, host_side=True)

    async def first():
        r = Reconciler(fb, CONFIG, host_backend=host)
        r.start()
        try:
            r.upsert(record("a", "veth-a", allow_internet_access=False))
            r.upsert(record("b", "veth-b"))
            await settle(r)
            r.delete("b")  # the agent then dies before it removes b's tables
            return export_state(r)[0]
        finally:
            await r.stop()

    doc = asyncio.run(first())
    host.tables["veth-b"] = host.tables.get("veth-b") or [{"add": {"table": {}}}]
    writes = len(host.writes)

    async def second():
        r = Reconciler(fb, CONFIG, host_backend=host)
        assert restore_state(r, doc) == []
        assert r.desired["a"].host_interface == "veth-a"
        r.sync.adopt_by_fingerprint = True
        r.start()
        try:
            assert await r.wait_idle(5)
            assert await r.prune_host() == ["veth-b"]
        finally:
            await r.stop()

    asyncio.run(second())
    assert [w for w in host.writes[writes:] if w[0] != "remove"] == []
    assert set(host.tables) == {"veth-a"}


class GuardHost:
    """A host namespace that holds only the guard table: what `nft` would list of it, and what was run."""

    def __init__(self):
        self.rules = None  # the guard's rules, or None when there is no guard table
        self.runs = 0

    def host_cmd(self, doc):
        cmds = doc["nftables"]
        if "list" in cmds[0]:
            if self.rules is None:
                return 1, None, "Error: No such file or directory"
            return 0, {"nftables": [{"rule": r} for r in self.rules]}, ""
        self.runs += 1
        self.rules = [c["add"]["rule"] for c in cmds if "rule" in c.get("add", {})]
        return 0, None, ""


def test_a_guard_that_went_away_is_logged_as_repaired_whoever_finds_it(caplog):
    host = GuardHost()
    hb = HostBackend(host, Config(), raw=False)
    with caplog.at_level("WARNING", logger="egressd"):
        assert hb.ensure_guard() and host.runs == 1  # the first write: nothing to repair
        assert not hb.ensure_guard() and host.runs == 1  # checked once until the next resync
        host.rules = None  # `nft flush ruleset` on the host
        hb.invalidate()
        assert hb.ensure_guard() and host.runs == 2
        assert [r.getMessage() for r in caplog.records].count("host_guard_repaired") == 1
        host.rules = host.rules[:-1]  # altered: its last rule gone
        hb.invalidate()
        hb.apply("veth-x", render(DENY_ALL, Config(), host=True))  # found by an apply, not the resync
    assert [r.getMessage() for r in caplog.records].count("host_guard_repaired") == 2


def test_a_restarted_agent_that_adopts_host_tables_knows_their_guard_should_be_there(caplog):
    """The first check after a restart: with a host-side table adopted, a missing guard is a repair (it was
    removed while no agent ran, or before the first resync), not a first write."""
    with caplog.at_level("WARNING", logger="egressd"):
        fresh = GuardHost()
        assert HostBackend(fresh, Config(), raw=False).ensure_guard() and fresh.runs == 1
        assert "host_guard_repaired" not in [r.getMessage() for r in caplog.records]  # a first start
        adopted = GuardHost()
        assert HostBackend(adopted, Config(), raw=False).ensure_guard(expected=True) and adopted.runs == 1
        assert [r.getMessage() for r in caplog.records].count("host_guard_repaired") == 1


def test_the_guard_logs_what_it_drops_per_interface_within_the_rate_and_says_so_in_its_comment():
    from egressd.model.config import Denials

    plain, logged = guard_commands(0x100000), guard_commands(0x100000, Denials(group=7, rate=5, burst=9))
    rules = [c["add"]["rule"] for c in logged if "rule" in c.get("add", {})]
    log_rule = rules[-2]["expr"]
    assert log_rule[-1] == {"log": {"prefix": "host", "group": 7}}
    meter = log_rule[1]["set"]
    assert meter["elem"] == {"meta": {"key": "iif"}} and meter["set"] == "@denials"
    assert meter["stmt"] == [{"limit": {"rate": 5, "burst": 9, "per": "second"}}]  # per interface
    assert rules[-1]["expr"][-1] == {"drop": None}  # after the log, whatever the limit said
    assert "log 7 5/9" in rules[-1]["comment"] and "log" not in plain[-1]["add"]["rule"]["comment"]
    assert len(plain) == len(logged) - 2  # the meter's set and the log rule
