"""The one apply algorithm (kernel/writer.py) and its plans (ruleset/transactions.py), run on the fake kernel,
which refuses what the kernel refuses: the stage-and-switch sequence is checked here without root."""

import pytest

from egressd.kernel.backend import ApplyError
from egressd.kernel.fake import FakeBackend, FakeKernel
from egressd.kernel.hostside import table_name, target_for
from egressd.kernel.writer import TableWriter
from egressd.model.config import Config
from egressd.model.sandbox import parse_sandbox
from egressd.reconcile.sync import generation_differs, listing_digest
from egressd.ruleset.render import render
from egressd.ruleset.transactions import active_variant, fingerprint_of, plan_apply, set_elements

NS = "/run/netns/a"


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


OLD_POLICY = policy(deny_out=["203.0.113.0/24"], allow_out=["a.test"])
NEW_POLICY = policy(deny_out=["198.51.100.0/24"], allow_out=["a.test"])
OLD = render(OLD_POLICY, Config())
NEW = render(NEW_POLICY, Config())


class KernelRunner:
    """A Runner over a FakeKernel that can refuse the next step of a given name, as a kernel might."""

    def __init__(self) -> None:
        self.kernel = FakeKernel()
        self.refuse: list[str] = []  # step names, each refused once, in turn
        self.steps: list[str] = []

    def run(self, where, commands, what):
        self.steps.append(what)
        if what in self.refuse:
            self.refuse.remove(what)
            raise ApplyError(f"refused {what}")
        self.kernel.run(where, commands)

    def read(self, where):
        return self.kernel.listing(where)


def objects(listing):
    return sorted(next(iter(i.values()))["name"] for i in listing if "chain" in i or "set" in i)


# --- the fake kernel refuses what the kernel refuses ----------------------------------------------------------


def test_create_refuses_an_existing_object_and_add_does_not():
    k = FakeKernel()
    t = {"family": "inet", "table": "egressd"}
    k.run(
        NS,
        [{"add": {"table": {"family": "inet", "name": "egressd"}}}, {"add": {"chain": {**t, "name": "c"}}}],
    )
    k.run(NS, [{"add": {"chain": {**t, "name": "c"}}}])
    with pytest.raises(ApplyError, match="File exists"):
        k.run(NS, [{"create": {"chain": {**t, "name": "c"}}}])
    assert objects(k.listing(NS)) == ["c"]


def test_a_refused_command_undoes_its_whole_transaction():
    k = FakeKernel()
    t = {"family": "inet", "table": "egressd"}
    k.run(NS, [{"add": {"table": {"family": "inet", "name": "egressd"}}}])
    with pytest.raises(ApplyError, match="No such file"):
        k.run(NS, [{"add": {"chain": {**t, "name": "c"}}}, {"delete": {"set": {**t, "name": "nope"}}}])
    assert objects(k.listing(NS)) == []
    with pytest.raises(ApplyError, match="No such file"):
        k.run("/run/netns/other", [{"add": {"chain": {**t, "name": "c"}}}])  # no table there


def test_chains_and_sets_in_use_cannot_be_deleted():
    k = FakeKernel()
    t = {"family": "inet", "table": "egressd"}
    jump = {"rule": {**t, "chain": "out", "expr": [{"jump": {"target": "decide"}}]}}
    reads = {"rule": {**t, "chain": "decide", "expr": [{"match": {"op": "==", "left": 1, "right": "@s"}}]}}
    k.run(
        NS,
        [
            {"add": {"table": {"family": "inet", "name": "egressd"}}},
            {"add": {"chain": {**t, "name": "out"}}},
            {"add": {"chain": {**t, "name": "decide"}}},
            {"add": {"set": {**t, "name": "s", "type": "ipv4_addr"}}},
            {"add": jump},
            {"add": reads},
        ],
    )
    for cmd in (
        {"delete": {"chain": {**t, "name": "decide"}}},  # has a rule, and out jumps to it
        {"delete": {"set": {**t, "name": "s"}}},  # decide reads it
    ):
        with pytest.raises(ApplyError, match="busy"):
            k.run(NS, [cmd])
    with pytest.raises(ApplyError, match="No such file"):
        k.run(NS, [{"add": {"rule": {**t, "chain": "out", "expr": [{"jump": {"target": "gone"}}]}}}])
    # emptied in the same transaction, in the right order, they go
    k.run(
        NS,
        [
            {"flush": {"chain": {**t, "name": "out"}}},
            {"flush": {"chain": {**t, "name": "decide"}}},
            {"delete": {"chain": {**t, "name": "decide"}}},
            {"delete": {"set": {**t, "name": "s"}}},
        ],
    )
    assert objects(k.listing(NS)) == ["out"]


def test_elements_are_added_and_deleted_as_the_kernel_does():
    k = FakeKernel()
    t = {"family": "inet", "table": "egressd"}
    k.run(NS, [{"add": {"table": {"family": "inet", "name": "egressd"}}}])
    k.run(NS, [{"add": {"set": {**t, "name": "s", "type": "ipv4_addr"}}}])
    k.run(NS, [{"add": {"element": {**t, "name": "s", "elem": ["192.0.2.1", "192.0.2.2"]}}}])
    with pytest.raises(ApplyError, match="No such file"):
        k.run(NS, [{"delete": {"element": {**t, "name": "s", "elem": ["192.0.2.1", "192.0.2.9"]}}}])
    assert set_elements(k.listing(NS), ["s"]) == {"s": frozenset({"192.0.2.1", "192.0.2.2"})}


# --- the plans, run -------------------------------------------------------------------------------------------


def test_a_first_apply_is_one_transaction_and_updates_are_stage_then_switch():
    runner = KernelRunner()
    w = TableWriter(runner)
    w.apply(NS, OLD, {"allow_dns4": {"192.0.2.7"}}, None)
    assert runner.steps == ["table"]
    first = runner.kernel.listing(NS)
    assert active_variant(first) == "a" and fingerprint_of(first) == OLD.fingerprint
    w.apply(NS, NEW, {"allow_dns4": {"192.0.2.7"}}, None)  # from memory: no read needed
    assert runner.steps == ["table", "staged policy", "switch"]
    second = runner.kernel.listing(NS)
    assert active_variant(second) == "b" and fingerprint_of(second) == NEW.fingerprint
    assert all(n.endswith("_b") for n in objects(second) if n.startswith(("decide", "deny", "allow")))
    assert set_elements(second, ["allow_dns4"]) == {"allow_dns4": frozenset({"192.0.2.7"})}
    w.apply(NS, OLD, None, None)
    third = runner.kernel.listing(NS)
    assert active_variant(third) == "a" and fingerprint_of(third) == OLD.fingerprint
    # a table reached by updates lists like one written whole: the digests of a shape agree
    fresh = KernelRunner()
    TableWriter(fresh).apply(NS, OLD, None, None)
    assert listing_digest(third) == listing_digest(fresh.kernel.listing(NS))


def test_between_stage_and_switch_the_old_policy_is_in_force():
    runner = KernelRunner()
    w = TableWriter(runner)
    w.apply(NS, OLD, None, None)
    # refused from memory, then again from the listing (which first clears what the first stage left)
    runner.refuse = ["switch", "switch"]
    with pytest.raises(ApplyError):
        w.apply(NS, NEW, None, None)
    staged = runner.kernel.listing(NS)
    assert fingerprint_of(staged) == OLD.fingerprint and active_variant(staged) == "a"
    assert "decide_b" in objects(staged)  # the new policy waits, unused
    # memory is gone after a failure: the next apply reads, clears the leftovers and switches
    w.apply(NS, NEW, None, None)
    assert runner.steps == ["table"] + ["staged policy", "switch"] * 3
    done = runner.kernel.listing(NS)
    assert fingerprint_of(done) == NEW.fingerprint and active_variant(done) == "b"
    assert not [n for n in objects(done) if n.endswith("_a")]


def test_a_planted_object_under_the_staging_name_is_never_mixed_in():
    runner = KernelRunner()
    w = TableWriter(runner)
    w.apply(NS, OLD, None, None)
    t = {"family": "inet", "table": "egressd"}
    planted = {"rule": {**t, "chain": "decide_b", "expr": [{"accept": None}]}}
    runner.kernel.run(NS, [{"add": {"chain": {**t, "name": "decide_b"}}}, {"add": planted}])
    w.apply(NS, NEW, None, None)  # the remembered plan's `create` is refused; the listing's plan clears it
    assert runner.steps == ["table", "staged policy", "staged policy", "switch"]
    done = runner.kernel.listing(NS)
    fresh = KernelRunner()
    TableWriter(fresh).apply(NS, NEW, None, None)
    assert fingerprint_of(done) == NEW.fingerprint
    assert listing_digest(done) == listing_digest(fresh.kernel.listing(NS))


def test_a_table_deleted_behind_the_writers_back_is_written_whole():
    runner = KernelRunner()
    w = TableWriter(runner)
    w.apply(NS, OLD, None, None)
    del runner.kernel.tables[NS]
    w.apply(NS, NEW, None, None)
    assert runner.steps == ["table", "staged policy", "table"]
    assert fingerprint_of(runner.kernel.listing(NS)) == NEW.fingerprint


def test_a_foreign_table_is_replaced_whole():
    runner = KernelRunner()
    t = {"family": "inet", "table": "egressd"}
    runner.kernel.run(
        NS,
        [{"add": {"table": {"family": "inet", "name": "egressd"}}}, {"add": {"chain": {**t, "name": "x"}}}],
    )
    plan = plan_apply(OLD, None, runner.read(NS))
    assert [s.what for s in plan.steps] == ["table"] and plan.written.variant == "a"
    TableWriter(runner).apply(NS, OLD, None, runner.read(NS))
    assert "x" not in objects(runner.kernel.listing(NS))


def test_the_host_side_target_runs_the_same_plans_on_its_own_table():
    runner = KernelRunner()
    w = TableWriter(runner, target_for=target_for)
    host = Config()
    w.apply("veth-a", render(OLD_POLICY, host, host=True), None, None)
    w.apply("veth-a", render(NEW_POLICY, host, host=True), None, None)
    named = set()
    for _, cmds in runner.kernel.transactions:
        for cmd in cmds:
            (body,) = cmd.values()
            (obj,) = body.values()
            named.add((obj["family"], obj.get("table", obj.get("name"))))
    assert named == {("netdev", table_name("veth-a"))}
    listing = runner.kernel.listing("veth-a")
    assert fingerprint_of(listing) == render(NEW_POLICY, host, host=True).fingerprint
    assert active_variant(listing) == "b"
    hooks = [i["chain"] for i in listing if "chain" in i and "hook" in i["chain"]]
    assert [(h["hook"], h["dev"]) for h in hooks] == [("ingress", "veth-a")]


def test_element_updates_change_only_the_variant_in_force():
    fb = FakeBackend(namespaces={NS})
    fb.apply(NS, OLD, {"allow_dns4": {"192.0.2.1"}})
    fb.apply(NS, NEW, {"allow_dns4": {"192.0.2.1"}})  # now variant b
    fb.update_elements(NS, {"allow_dns4": {"192.0.2.2"}}, {"allow_dns4": {"192.0.2.1"}}, "b")
    assert fb.elements[NS]["allow_dns4"] == {"192.0.2.2"}
    with pytest.raises(ApplyError):
        fb.update_elements(NS, {}, {"allow_dns4": {"192.0.2.9"}}, "b")  # not there: refused whole
    with pytest.raises(ApplyError):
        fb.update_elements(NS, {"allow_dns4": {"192.0.2.3"}}, {}, "a")  # variant a was retired
    assert fb.elements[NS]["allow_dns4"] == {"192.0.2.2"}


def test_a_restart_adopts_a_table_with_dns_sets_on_its_fingerprint_and_its_sets_alone():
    """A sandbox naming hosts: on restart its DNS sets are read set by set (raw netlink in the real
    backend), not the whole table; sets that hold other addresses fall back to the full read and an update."""
    from egressd.reconcile.sync import TableSync

    fb = FakeBackend(namespaces={NS})
    sync = TableSync(Config())
    rs = sync.render(policy(allow_internet_access=False, allow_out=["a.test", "198.51.100.1"]))
    assert rs.dns_sets
    elements = {"allow_dns4": frozenset({"192.0.2.1"}), "allow_dns6": frozenset({"2001:db8::1"})}
    first = sync.sync(fb, NS, rs, elements, None)
    sync.learned(first)
    fb.apply(NS, rs, elements)  # a second write: the table now runs on the other variant
    sync.adopt_by_fingerprint = True
    reads = fb.reads
    again = sync.sync(fb, NS, rs, elements, first.fingerprint)
    assert (again.outcome, again.writes, fb.reads) == ("adopted", 0, reads)  # no full read
    moved = {**elements, "allow_dns4": frozenset({"192.0.2.2"})}  # the name now answers elsewhere
    third = sync.sync(fb, NS, rs, moved, first.fingerprint)
    assert third.outcome == "dns_updated" and fb.reads == reads + 1
    assert set_elements(fb.read(NS), ["allow_dns4"]) == {"allow_dns4": frozenset({"192.0.2.2"})}


def test_a_generation_is_compared_apart_from_the_shape_it_leaves_out():
    """OLD and NEW are one shape with two generations: their tables digest alike, and each table's
    generation is checked against its own policy's."""
    assert OLD.shape == NEW.shape and OLD.generation != NEW.generation != 0
    old, new = KernelRunner(), KernelRunner()
    TableWriter(old).apply(NS, OLD, None, None)
    TableWriter(new).apply(NS, NEW, None, None)
    assert listing_digest(old.kernel.listing(NS)) == listing_digest(new.kernel.listing(NS))
    assert generation_differs(old.kernel.listing(NS), OLD) is None
    assert generation_differs(old.kernel.listing(NS), NEW) == (
        f"chain output carries generation {OLD.generation}, not {NEW.generation}"
    )
