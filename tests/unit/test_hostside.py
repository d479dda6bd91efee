"""The host-side table against the fake backend: groups, dispatch, adoption, repair, removal. No root."""

import asyncio

import pytest

from egressd.config import Config
from egressd.hostside import HOST_TABLE, HostSide, HostTableError, policy_tag, sandbox_key
from egressd.nft import FakeBackend
from egressd.policy import DENY_ALL, PolicyError, parse_sandbox
from egressd.reconcile import Reconciler, export_state, restore_state
from egressd.render import render
from tests.unit.test_reconcile import CONFIG, run, settle

DNS = {"allow_dns4": frozenset({"198.51.100.7"}), "allow_dns6": frozenset()}


def host_ruleset(**np):
    return render(parse_sandbox({"id": "x", "network_policy": np}).policy, Config(), host=True)


def dispatch(fb):
    return {e[0]: e[1]["jump"]["target"] for e in fb.host["maps"]["dispatch"]["elem"]} if fb.host else {}


def group_of(fb, iface):
    """The group an interface leads to: dispatch -> entry chain -> its one jump."""
    entry = fb.host["chains"][dispatch(fb)[iface]]["rules"]
    return entry[0]["expr"][0]["jump"]["target"].removesuffix("_decide") if entry else None


def chains_of(fb, sid):
    return sorted(n for n in (fb.host or {}).get("chains", {}) if n.startswith(sandbox_key(sid)))


def test_the_host_ruleset_is_the_same_decision_without_loopback_and_with_nd_kept_on_the_link():
    netns = render(parse_sandbox({"id": "x"}).policy, Config())
    host = host_ruleset()
    text = str(host.variant)
    assert "oifname" not in text and "'fib'" in text and "fe80::" in text
    assert host.hooks == [] and host.fingerprint != netns.fingerprint
    assert "reject" not in text  # what gets this far bypassed the sandbox's own table: drop it
    assert host.names == netns.names


def test_sync_writes_once_then_costs_nothing_and_a_new_process_adopts():
    fb = FakeBackend()
    h = HostSide(fb)
    rs = host_ruleset(allow_internet_access=False, allow_out=["192.0.2.0/24"])
    assert h.sync("sb1", "veth1", rs, {}).outcome == "applied"
    assert dispatch(fb) == {"veth1": sandbox_key("sb1")}
    assert group_of(fb, "veth1") == f"{sandbox_key('sb1')}_{policy_tag(rs.fingerprint, {})}0"
    writes = len(fb.writes)
    assert h.sync("sb1", "veth1", rs, {}).outcome == "unchanged"
    h.invalidate()
    assert h.sync("sb1", "veth1", rs, {}).outcome == "unchanged"
    assert HostSide(fb).sync("sb1", "veth1", rs, {}).outcome == "unchanged"
    assert len(fb.writes) == writes


def test_an_update_stages_a_new_group_then_switches_and_retires_the_old():
    fb = FakeBackend()
    h = HostSide(fb)
    h.sync("sb1", "veth1", host_ruleset(allow_internet_access=False), {})
    old = chains_of(fb, "sb1")
    new_rs = host_ruleset(allow_out=["api.example.com"])
    assert h.sync("sb1", "veth1", new_rs, DNS).outcome == "applied"
    assert fb.writes[-2:] == [("host", "host-side staged policy"), ("host", "host-side switch")]
    assert set(chains_of(fb, "sb1")) & set(old) == {sandbox_key("sb1")}  # only the entry chain stays
    assert len(chains_of(fb, "sb1")) == 3
    group = group_of(fb, "veth1")
    assert fb.host["sets"][f"{group}_allow_dns4"]["elem"] == ["198.51.100.7"]
    # New DNS answers are a new group: sets are never edited element by element (see hostside's doc).
    moved = {"allow_dns4": frozenset({"198.51.100.8"}), "allow_dns6": frozenset({"2001:db8::8"})}
    assert h.sync("sb1", "veth1", new_rs, moved).outcome == "applied"
    group = group_of(fb, "veth1")
    assert fb.host["sets"][f"{group}_allow_dns4"]["elem"] == ["198.51.100.8"]
    assert fb.host["sets"][f"{group}_allow_dns6"]["elem"] == ["2001:db8::8"]
    assert h.sync("sb1", "veth1", new_rs, moved).outcome == "unchanged"


def test_sandboxes_share_the_table_and_never_touch_each_other():
    fb = FakeBackend()
    h = HostSide(fb)
    h.sync("a", "veth-a", host_ruleset(allow_internet_access=False), {})
    h.sync("b", "veth-b", host_ruleset(allow_internet_access=False), {})
    before_b = chains_of(fb, "b")
    h.sync("a", "veth-a", host_ruleset(deny_out=["203.0.113.0/24"]), {})
    assert chains_of(fb, "b") == before_b and set(dispatch(fb)) == {"veth-a", "veth-b"}
    assert h.remove("a") and not h.remove("a")
    assert group_of(fb, "veth-a") is None  # leads nowhere until the bulk cleanup
    assert chains_of(fb, "a") == [sandbox_key("a")]
    assert h.collect() == 1 and h.collect() == 0
    assert set(dispatch(fb)) == {"veth-b"} and chains_of(fb, "a") == []
    assert fb.host["chains"]["prerouting"]["rules"]  # the hook stays for the others


def test_moving_to_another_interface_leaves_nothing_on_the_old_one():
    fb = FakeBackend()
    h = HostSide(fb)
    rs = host_ruleset()
    h.sync("a", "veth1", rs, {})
    result = h.sync("a", "veth2", rs, {})
    assert result.outcome == "applied" and result.detail is None
    assert set(dispatch(fb)) == {"veth2"} and len(chains_of(fb, "a")) == 3


def test_a_deleted_table_or_element_is_repaired_and_an_altered_group_replaced():
    fb = FakeBackend()
    h = HostSide(fb)
    rs = host_ruleset(allow_internet_access=False)
    for sid in "abc":
        h.sync(sid, f"veth-{sid}", rs, {})
    fb.host = None  # `nft flush ruleset` on the host
    h.invalidate()
    result = h.sync("a", "veth-a", rs, {})
    assert result.outcome == "repaired" and "removed" in result.detail
    assert len(fb.host["chains"]["prerouting"]["rules"]) == 1
    assert h.sync("b", "veth-b", rs, {}).outcome == "repaired"
    assert h.sync("c", "veth-c", rs, {}).outcome == "repaired"
    # Someone edits a's chain in place: it no longer looks like the other groups of its policy.
    group = group_of(fb, "veth-a")
    fb.host["chains"][f"{group}_decide"]["rules"].insert(
        0, {"family": "inet", "table": HOST_TABLE, "chain": f"{group}_decide", "expr": [{"accept": None}]}
    )
    h.invalidate()
    result = h.sync("a", "veth-a", rs, {})
    assert result.outcome == "repaired" and result.detail == "host-side chain was altered"
    assert h.sync("b", "veth-b", rs, {}).outcome == "unchanged"
    assert group_of(fb, "veth-a") != group  # a fresh group, then the altered one retired
    assert f"{group}_decide" not in fb.host["chains"]


def test_a_missing_hook_rule_is_added_back_once():
    fb = FakeBackend()
    h = HostSide(fb)
    rs = host_ruleset()
    h.sync("a", "veth1", rs, {})
    fb.host["chains"]["prerouting"]["rules"] = []
    h.invalidate()
    h.sync("a", "veth1", rs, {})
    h.invalidate()
    h.sync("b", "veth2", rs, {})
    assert len(fb.host["chains"]["prerouting"]["rules"]) == 1


def test_a_failed_switch_leaves_the_old_policy_and_the_next_try_succeeds():
    fb = FakeBackend()
    h = HostSide(fb)
    h.sync("a", "veth1", host_ruleset(allow_internet_access=False), {})
    before = group_of(fb, "veth1")
    calls = []

    def fail(netns, op):
        calls.append(op)
        return HostTableError("injected") if len(calls) == 2 else None

    fb.fail = fail
    with pytest.raises(HostTableError):
        h.sync("a", "veth1", host_ruleset(), {})
    assert group_of(fb, "veth1") == before  # still the old policy, never none
    fb.fail = None
    assert h.sync("a", "veth1", host_ruleset(), {}).outcome == "applied"
    assert len(chains_of(fb, "a")) == 3  # the staged leftover was retired too


def test_prune_removes_groups_of_sandboxes_no_one_lists():
    fb = FakeBackend()
    h = HostSide(fb)
    for sid in "abc":
        h.sync(sid, f"veth-{sid}", host_ruleset(), {})
    assert sorted(HostSide(fb).prune(["b"])) == sorted([sandbox_key("a"), sandbox_key("c")])
    assert set(dispatch(fb)) == {"veth-b"} and chains_of(fb, "a") == chains_of(fb, "c") == []


# --- through the reconciler ------------------------------------------------------------------------------


def record(sid, iface, netns=True, rev=None, **np):
    r = {"id": sid, "revision": rev, "host_interface": iface, "network_policy": np}
    if netns:
        r["netns"] = f"/run/netns/{sid}"
    return parse_sandbox(r)


def test_the_reconciler_enforces_the_host_side_even_before_the_namespace_exists():
    async def scenario(r, fb):
        r.upsert(record("z", "veth-z", allow_internet_access=False))
        await settle(r)
        assert "veth-z" in dispatch(fb)
        assert r.status["z"].state == "pending"  # its own namespace is not there
        assert r.counters["host_applied"] == 1

    run(scenario)


def test_the_reconciler_applies_both_and_removes_both():
    async def scenario(r, fb):
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        assert await r.wait_enforced("a", None, 5)
        assert "veth-a" in dispatch(fb) and "/run/netns/a" in fb.tables
        r.upsert(record("a", None, allow_internet_access=False))  # host_interface dropped from the record
        await settle(r)
        assert group_of(fb, "veth-a") is None and "/run/netns/a" in fb.tables
        r.upsert(record("a", "veth-a", deny_out=["203.0.113.0/24"]))
        await settle(r)
        r.delete("a")
        await settle(r)
        assert group_of(fb, "veth-a") is None and "/run/netns/a" not in fb.tables
        r.resync()  # the bulk cleanup of what leads nowhere runs with every resync
        await settle(r)
        await asyncio.sleep(0.05)
        assert dispatch(fb) == {} and chains_of(fb, "a") == []

    run(scenario)


def test_an_interface_belongs_to_one_sandbox_only():
    async def scenario(r, fb):
        r.upsert(record("a", "veth1"))
        assert not r.upsert(record("b", "veth1"))
        await settle(r)
        assert dispatch(fb)["veth1"] == sandbox_key("a")
        assert "already used by sandbox 'a'" in r.status["b"].error
        assert r.desired["b"].policy == DENY_ALL and r.desired["b"].host_interface is None

    run(scenario)


def test_an_invalid_first_record_closes_the_host_side_too():
    async def scenario(r, fb):
        r.reject(PolicyError(["bad entry"], "a", "/run/netns/a", 1, "veth-a"))
        await settle(r)
        group = group_of(fb, "veth-a")
        rules = fb.host["chains"][f"{group}_decide"]["rules"]
        assert rules[-1]["expr"] == [{"jump": {"target": f"{group}_deny"}}]  # the internet: denied

    run(scenario)


def test_a_failing_host_side_is_an_error_and_retried():
    attempts = []

    def fail(netns, op):
        if netns == "host" and len(attempts) < 2:
            attempts.append(op)
            return HostTableError("injected")
        return None

    async def scenario(r, fb):
        fb.fail = fail
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        assert await r.wait_enforced("a", None, 5)
        assert len(attempts) == 2 and r.counters["host_failed"] == 2 and "veth-a" in dispatch(fb)

    run(scenario, FakeBackend(namespaces={"/run/netns/a"}))


def test_state_keeps_the_interface_and_a_restart_writes_nothing():
    fb = FakeBackend(namespaces={"/run/netns/a"})

    async def first(r, _):
        r.upsert(record("a", "veth-a", allow_internet_access=False))
        assert await r.wait_enforced("a", None, 5)
        return export_state(r)[0]

    doc = run(first, fb)
    writes = len(fb.writes)

    async def second():
        r = Reconciler(fb, CONFIG)
        assert restore_state(r, doc) == []
        assert r.desired["a"].host_interface == "veth-a"
        r.adopt_by_fingerprint = True
        r.start()
        try:
            assert await r.wait_idle(5)
        finally:
            await r.stop()

    asyncio.run(second())
    assert len(fb.writes) == writes
