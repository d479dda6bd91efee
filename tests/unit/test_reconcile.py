"""The reconciler against the fake backend: coalescing, ordering, failures, drift, adoption. No root."""

import asyncio
import dataclasses
import random
import threading

from egressd.kernel.backend import ApplyError
from egressd.kernel.fake import FakeBackend
from egressd.model.config import config_from_dict
from egressd.model.events import parse_event
from egressd.model.sandbox import DENY_ALL, PolicyError, parse_sandbox
from egressd.reconcile.queue import KeyedQueue
from egressd.reconcile.reconciler import Reconciler
from egressd.reconcile.restart import export_state, restore_state
from egressd.reconcile.sync import LISTING_FORM, elements_differ
from egressd.ruleset.render import render
from egressd.ruleset.variants import create_commands

CONFIG = config_from_dict({"reconcile": {"retry_initial": 0.01, "retry_max": 0.05, "workers": 2}})


def record(sid="a", rev=None, netns=None, **np):
    return {"id": sid, "netns": netns or f"/run/netns/{sid}", "revision": rev, "network_policy": np}


def sandbox(*args, **kw):
    return parse_sandbox(record(*args, **kw))


def fp(**np):
    return render(sandbox(**np).policy, CONFIG).fingerprint


def run(scenario, backend=None, **kw):
    """Run scenario(reconciler, backend) inside a fresh event loop with workers started; kw go to the
    Reconciler (its seams: persist, flush, dns, ...)."""
    backend = backend or FakeBackend(namespaces={f"/run/netns/{c}" for c in "abc"})

    async def main():
        r = Reconciler(backend, CONFIG, rng=random.Random(1), **kw)
        r.start()
        try:
            return await asyncio.wait_for(scenario(r, backend), 10)
        finally:
            await r.stop()

    return asyncio.run(main())


async def settle(r):
    assert await r.wait_idle(5)
    await asyncio.sleep(0)


def test_upsert_applies_once_and_unchanged_costs_nothing():
    async def scenario(r, fb):
        r.upsert(sandbox(deny_out=["1.1.1.1"]))
        assert await r.wait_enforced("a", None, 5)
        r.upsert(sandbox(deny_out=["1.1.1.1"]))
        r.resync()
        await settle(r)
        assert fb.writes == [("apply", "/run/netns/a")]
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["1.1.1.1"])
        assert (
            r.status["a"].state == "enforced" and r.counters["unchanged"] >= 1
        )  # upsert and resync coalesce

    run(scenario)


def test_a_burst_coalesces_and_the_latest_wins():
    async def scenario(r, fb):
        for i in range(200):
            r.upsert(sandbox(rev=i, deny_out=[f"10.0.{i}.1"]))
        assert await r.wait_enforced("a", 199, 5)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["10.0.199.1"])
        assert len(fb.writes) <= 3

    run(scenario)


def test_lower_revision_is_ignored():
    async def scenario(r, fb):
        assert r.upsert(sandbox(rev=5, allow_internet_access=False))
        assert not r.upsert(sandbox(rev=3))
        assert await r.wait_enforced("a", 5, 5)
        assert fb.fingerprint("/run/netns/a") == fp(allow_internet_access=False)

    run(scenario)


def test_delete_removes_the_table_and_a_late_older_upsert_stays_dead():
    async def scenario(r, fb):
        r.upsert(sandbox(rev=2))
        assert await r.wait_enforced("a", 2, 5)
        r.delete("a")
        await settle(r)
        assert fb.fingerprint("/run/netns/a") is None and "a" not in r.status
        assert not r.upsert(sandbox(rev=1))
        assert r.upsert(sandbox(rev=3))

    run(scenario)


def test_snapshot_forgets_what_it_does_not_list():
    async def scenario(r, fb):
        r.upsert(sandbox("a"))
        r.upsert(sandbox("b"))
        await settle(r)
        r.snapshot(parse_event({"type": "snapshot", "sandboxes": [record("b"), record("c")]}))
        await settle(r)
        assert sorted(r.desired) == ["b", "c"]
        assert fb.fingerprint("/run/netns/a") is None and fb.fingerprint("/run/netns/c") is not None

    run(scenario)


def test_snapshot_with_an_unreadable_record_forgets_nothing():
    async def scenario(r, fb):
        r.upsert(sandbox("a"))
        await settle(r)
        r.snapshot(parse_event({"type": "snapshot", "sandboxes": [record("b"), {"id": 7}]}))
        await settle(r)
        assert sorted(r.desired) == ["a", "b"]
        assert fb.fingerprint("/run/netns/a") is not None

    run(scenario)


def test_snapshot_keeps_a_listed_but_invalid_sandbox_on_its_last_good_policy():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=1, allow_internet_access=False))
        await settle(r)
        bad = record("a", rev=2, deny_out=["999.1.1.1"])
        r.snapshot(parse_event({"type": "snapshot", "sandboxes": [bad]}))
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(allow_internet_access=False)
        assert r.status["a"].state == "error" and "999.1.1.1" in r.status["a"].error

    run(scenario)


def test_invalid_first_policy_closes_the_sandbox():
    async def scenario(r, fb):
        try:
            parse_sandbox(record("a", rev=1, allow_out=["http://x"]))
        except PolicyError as e:
            r.reject(e)
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == render(DENY_ALL, CONFIG).fingerprint
        st = r.status["a"]
        assert (
            st.state == "error"
            and st.error.startswith("closed (deny-all): ")
            and "looks like a URL" in st.error
        )
        assert not await r.wait_enforced("a", 1, 0.1)

    run(scenario)


def test_invalid_update_keeps_the_last_good_policy():
    async def scenario(r, fb):
        r.upsert(sandbox(rev=1, deny_out=["1.1.1.1"]))
        assert await r.wait_enforced("a", 1, 5)
        try:
            parse_sandbox(record(rev=2, deny_out=["300.0.0.1"]))
        except PolicyError as e:
            r.reject(e)
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["1.1.1.1"])
        assert r.status["a"].state == "error"
        assert r.status["a"].error.startswith("revision 2 rejected, still enforcing revision 1")
        r.upsert(sandbox(rev=3, deny_out=["2.2.2.2"]))
        assert await r.wait_enforced("a", 3, 5)
        assert r.status["a"].error is None

    run(scenario)


def test_a_namespace_that_appears_later_is_enforced_without_a_new_event():
    async def scenario(r, fb):
        r.upsert(sandbox("late"))
        await asyncio.sleep(0.05)
        assert r.status["late"].state == "pending"
        fb.namespaces.add("/run/netns/late")
        assert await r.wait_enforced("late", None, 5)

    run(scenario)


def test_a_failed_transaction_is_retried_with_backoff():
    failures = {"left": 3}

    def fail(netns, op):
        if op == "apply" and failures["left"]:
            failures["left"] -= 1
            return ApplyError("injected")
        return None

    fb = FakeBackend(namespaces={"/run/netns/a"}, fail=fail)

    async def scenario(r, fb):
        r.upsert(sandbox())
        assert await r.wait_enforced("a", None, 5)
        assert r.counters["failed"] == 3 and failures["left"] == 0

    run(scenario, fb)


def test_drift_is_repaired_on_resync():
    async def scenario(r, fb):
        r.upsert(sandbox(allow_internet_access=False))
        await settle(r)
        del fb.tables["/run/netns/a"]  # deleted from inside the sandbox
        r.resync()
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(allow_internet_access=False)
        # altered in place, fingerprint rule left intact: only the digest can tell
        fb.tables["/run/netns/a"] = [
            c for c in fb.tables["/run/netns/a"] if c["add"].get("rule", {}).get("chain") != "decide_a"
        ]
        r.resync()
        await settle(r)
        assert r.counters["repaired"] == 2
        decide = [c for c in fb.tables["/run/netns/a"] if c["add"].get("rule", {}).get("chain") == "decide_b"]
        assert decide  # the repair staged the policy in variant b and switched to it

    run(scenario)


def test_restart_adopts_tables_without_writing():
    fb = FakeBackend(namespaces={"/run/netns/a", "/run/netns/b"})
    saved = {}

    async def first(r, fb):
        r.upsert(sandbox("a", deny_out=["1.1.1.1"]))
        r.upsert(sandbox("b", allow_internet_access=False))
        await settle(r)
        saved.update(export_state(r)[0])

    run(first, fb)
    writes = len(fb.writes)

    async def second(r, fb):
        assert restore_state(r, saved) == []
        await settle(r)
        assert r.status["a"].state == r.status["b"].state == "enforced"

    run(second, fb)
    assert len(fb.writes) == writes


def test_restart_rewrites_a_table_tampered_while_the_agent_was_down():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = {}

    async def first(r, fb):
        r.upsert(sandbox("a", allow_internet_access=False))
        await settle(r)
        saved.update(export_state(r)[0])

    run(first, fb)
    fb.tables["/run/netns/a"] = [c for c in fb.tables["/run/netns/a"] if "set" not in c["add"]][
        :-3
    ] + fb.tables["/run/netns/a"][-1:]

    async def second(r, fb):
        restore_state(r, saved)
        await settle(r)
        assert r.counters["repaired"] == 1

    run(second, fb)


def test_a_namespace_can_belong_to_one_sandbox_only():
    async def scenario(r, fb):
        r.upsert(sandbox("a", allow_internet_access=False))
        await settle(r)
        assert not r.upsert(sandbox("b", netns="/run/netns/a"))
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(allow_internet_access=False)
        assert "already used by sandbox 'a'" in r.status["b"].error

    run(scenario)


def test_moving_to_another_namespace_removes_the_old_table():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=1))
        await settle(r)
        r.upsert(sandbox("a", rev=2, netns="/run/netns/c"))
        assert await r.wait_enforced("a", 2, 5)
        assert fb.fingerprint("/run/netns/a") is None and fb.fingerprint("/run/netns/c") is not None

    run(scenario)


def test_digests_are_one_per_shape_and_pruned_with_the_policies():
    async def scenario(r, fb):
        for i in range(5):  # five policies of one shape: the kernel's listing is learnt once
            r.upsert(sandbox(rev=i, deny_out=[f"10.0.0.{i}"]))
            assert await r.wait_enforced("a", i, 5)
        assert len(r.sync.digests) == 1 and len(r.sync.shapes) == 5
        assert fb.reads == 1 + 5  # the read back of the first table, and one read before each write
        r.upsert(sandbox("b", allow_out=["192.0.2.0/24"], allow_internet_access=False))  # another shape
        await settle(r)
        assert len(r.sync.digests) == 2
        r.delete("b")
        await settle(r)
        r.resync()
        await settle(r)
        assert list(r.sync.shapes) == [fp(deny_out=["10.0.0.4"])] and len(r.sync.digests) == 1

    run(scenario)


def test_desired_state_is_written_before_applying_but_once_per_burst():
    flushes = []
    backend = FakeBackend(namespaces={f"/run/netns/n{i}" for i in range(100)})

    async def main():
        holder = []

        async def flush():
            r = holder[0]
            flushes.append(r.store.generation)
            r.persisted(r.store.generation)  # what the daemon's persister reports after a write

        r = Reconciler(backend, CONFIG, flush=flush, rng=random.Random(1))
        holder.append(r)
        r.start()
        try:
            for i in range(100):
                r.upsert(sandbox(f"n{i}"))
            assert await r.wait_idle(5)
            # every apply happened after a write that included its sandbox
            assert flushes and flushes[0] == 100
        finally:
            await r.stop()

    asyncio.run(main())
    assert len(flushes) == 1 and len(backend.writes) == 100


def _flush_recorder(order, flushed_at=None):
    """A flush as the daemon's persister does it: export (which notes the sandboxes being written), then
    the write is reported; each step is recorded in `order` beside the backend's writes."""
    holder = []
    flushed_at = [] if flushed_at is None else flushed_at  # how many tables the backend had written then

    async def flush():
        r = holder[0]
        _, generation = export_state(r)
        await asyncio.sleep(0.01)  # the write itself, on another thread in the agent
        order.append(("flush", generation))
        flushed_at.append(len(r.backend.writes))
        r.persisted(generation)

    return holder, flush


def test_a_sandbox_no_state_file_holds_is_applied_without_waiting_for_a_write():
    """New sandboxes have no older record on disk a restart could go back to: no write before their table.
    The control: a sandbox the state file read at start holds waits for a write, as before."""
    order = []
    backend = FakeBackend(namespaces={f"/run/netns/n{i}" for i in range(20)})

    async def main():
        holder, flush = _flush_recorder(order)
        r = Reconciler(backend, CONFIG, flush=flush, rng=random.Random(1))
        holder.append(r)
        r.disk.read(frozenset({"n0"}))  # what the daemon learns from the state file it read
        r.start()
        try:
            for i in range(1, 20):
                r.upsert(sandbox(f"n{i}"))
            assert await r.wait_idle(5)
            assert order == [] and len(backend.writes) == 19  # nineteen tables, no write waited for
            r.upsert(sandbox("n0"))
            assert await r.wait_enforced("n0", None, 5)
            assert order and order[0][0] == "flush" and r.disk.generation >= r.desired["n0"].generation
        finally:
            await r.stop()

    asyncio.run(main())


def test_a_sandbox_in_the_state_file_or_in_a_write_under_way_waits_for_its_record():
    """Once written, a sandbox's next revision is on disk before its table changes; and while a write that
    holds its older record is under way (it could land after the table changed), it waits for one too."""
    order, flushed_at = [], []
    backend = FakeBackend(namespaces={"/run/netns/a", "/run/netns/b"})

    async def main():
        holder, flush = _flush_recorder(order, flushed_at)
        r = Reconciler(backend, CONFIG, flush=flush, rng=random.Random(1))
        holder.append(r)
        r.disk.read(frozenset())
        r.start()
        try:
            r.upsert(sandbox("a", rev=1))
            assert await r.wait_enforced("a", 1, 5)
            assert order == []
            await flush()  # the persister's eventual write: "a" is on disk now
            order.clear()
            r.upsert(sandbox("a", rev=2, deny_out=["192.0.2.1"]))
            assert await r.wait_enforced("a", 2, 5)
            assert order[:1] == [("flush", r.desired["a"].generation)]
            writes = len(backend.writes)
            r.disk.exporting(
                frozenset({"b"})
            )  # a write holding b's record is under way, b's table not yet in
            r.upsert(sandbox("b", rev=1))
            assert await r.wait_enforced("b", 1, 5)
            # b's table went in only after a write that holds b's record
            assert order[-1] == ("flush", r.desired["b"].generation)
            assert backend.writes[writes:] == [("apply", "/run/netns/b")] and flushed_at[-1] == writes
        finally:
            await r.stop()

    asyncio.run(main())


def test_unknown_disk_contents_make_every_sandbox_wait_for_a_write():
    """A state file that could not be read may still hold records: until the first write, every sandbox
    waits for one (the daemon says on_disk() only for a file it read, or when there was none)."""
    order = []
    backend = FakeBackend(namespaces={"/run/netns/a"})

    async def main():
        holder, flush = _flush_recorder(order)
        r = Reconciler(backend, CONFIG, flush=flush, rng=random.Random(1))
        holder.append(r)
        r.start()
        try:
            r.upsert(sandbox("a"))
            assert await r.wait_enforced("a", None, 5)
            assert order == [("flush", r.desired["a"].generation)]
        finally:
            await r.stop()

    asyncio.run(main())


def test_restore_names_every_sandbox_of_the_file_as_on_disk():
    r = Reconciler(FakeBackend(), CONFIG)
    r.upsert(sandbox("a"))
    doc, _ = export_state(r)
    doc["sandboxes"].append({"record": {"id": "broken", "network_policy": {"allow_out": [7]}}})
    r2 = Reconciler(FakeBackend(), CONFIG, flush=lambda: None)
    restore_state(r2, doc)
    r2.upsert(sandbox("c"))
    assert r2.disk.must_wait("a", r2.desired["a"].generation)
    assert r2.disk.must_wait("broken", r2.desired["c"].generation)  # unreadable, still named
    assert not r2.disk.must_wait("c", r2.desired["c"].generation)


def test_a_full_disk_never_stops_enforcement(tmp_path, monkeypatch):
    """The persister reports the failed write and retries; the reconciler applies all the same."""
    from egressd.agent.persister import Persister
    from egressd.desired.statefile import StateFile

    backend = FakeBackend(namespaces={"/run/netns/a"})
    state = StateFile(tmp_path / "state")

    def full(doc):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(state, "save", full)

    async def main():
        holder = []
        persister = Persister(state, lambda: export_state(holder[0]), lambda g: None)
        r = Reconciler(backend, CONFIG, persist=persister.mark, flush=persister.flush, rng=random.Random(1))
        holder.append(r)
        r.start()
        try:
            r.upsert(sandbox(allow_internet_access=False))
            assert await r.wait_enforced("a", None, 5)
            assert persister.error == "[Errno 28] No space left on device"
        finally:
            await r.stop()

    asyncio.run(main())
    assert backend.fingerprint("/run/netns/a") == fp(allow_internet_access=False)


def test_ten_thousand_sandboxes_on_one_agent():
    """Scale of the bookkeeping alone (fake backend): every sandbox enforced, one write each, a snapshot that
    drops half of them removes exactly those tables."""
    n = 10_000
    backend = FakeBackend(namespaces={f"/run/netns/m{i}" for i in range(n)})

    async def scenario(r, fb):
        for i in range(n):
            r.upsert(sandbox(f"m{i}", deny_out=[f"10.{i // 256 % 256}.{i % 256}.0/24"]))
        assert await r.wait_idle(120)
        assert r.state_counts() == {"enforced": n, "pending": 0, "error": 0}
        keep = [record(f"m{i}", deny_out=[f"10.{i // 256 % 256}.{i % 256}.0/24"]) for i in range(0, n, 2)]
        r.snapshot(parse_event({"type": "snapshot", "sandboxes": keep}))
        assert await r.wait_idle(120)
        assert len(fb.tables) == n // 2 and len(r.status) == n // 2

    async def main():
        r = Reconciler(backend, CONFIG, rng=random.Random(1))
        r.start()
        try:
            await asyncio.wait_for(scenario(r, backend), 300)
        finally:
            await r.stop()

    asyncio.run(main())
    assert backend.writes.count(("apply", "/run/netns/m0")) == 1


def test_a_write_overtaken_by_a_newer_revision_is_not_taken_for_drift():
    """Revision 3 arrives while revision 2 is being written: writing 3 over 2 is no repair (found by the
    crash test, which saw `repaired` warnings with nobody but the agent touching the tables)."""
    entered, release = threading.Event(), threading.Event()

    def pause(netns, op):
        if op == "apply" and not release.is_set():
            entered.set()
            release.wait(5)
        return None

    async def scenario(r, fb):
        r.upsert(sandbox(rev=1, allow_internet_access=False))
        await settle(r)
        fb.fail = pause
        r.upsert(sandbox(rev=2, deny_out=["192.0.2.1"]))
        while not entered.is_set():
            await asyncio.sleep(0.01)
        r.upsert(sandbox(rev=3, deny_out=["192.0.2.3"]))
        release.set()
        assert await r.wait_enforced("a", 3, 5)
        assert r.counters["repaired"] == 0 and r.counters["applied"] == 3
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.3"])

    run(scenario)


def test_a_namespace_replaced_at_the_same_path_is_pending_then_applied_again(tmp_path):
    """The platform makes a new namespace at the same path with no new record: the agent's check (a stat
    per sandbox, every second in the daemon) sees another inode, says pending, and writes the table again;
    that is a new namespace, not a repair."""
    path = tmp_path / "ns"
    path.write_text("")
    fb = FakeBackend(namespaces={str(path)})

    async def scenario(r, fb):
        r.upsert(dataclasses.replace(sandbox(allow_internet_access=False), netns=str(path)))
        assert await r.wait_enforced("a", None, 5)
        assert r.check_namespaces() == []
        (tmp_path / "new").write_text("")
        (tmp_path / "new").replace(path)  # another inode at the same path
        del fb.tables[str(path)]  # the new namespace has no table
        assert r.check_namespaces() == ["a"]
        assert r.status["a"].state == "pending" and "replaced" in r.status["a"].error
        assert await r.wait_enforced("a", None, 5)
        assert str(path) in fb.tables and r.counters["repaired"] == 0 and r.counters["applied"] == 2

    run(scenario, fb)


def test_an_urgent_key_jumps_the_queue():
    async def scenario():
        q = KeyedQueue()
        for key in "abcd":
            q.add(key)
        q.add("c", urgent=True)  # already queued: moved to the front
        q.add("e", urgent=True)
        got = [await q.get() for _ in range(5)]
        assert got == ["e", "c", "a", "b", "d"]

    asyncio.run(scenario())


def _saved_after_first_run(fb, *sandboxes):
    saved = {}

    async def first(r, fb):
        for sb in sandboxes:
            r.upsert(sb)
        await settle(r)
        saved.update(export_state(r)[0])

    run(first, fb)
    return saved


def _count_renders(r):
    calls = []
    render_ = r.sync.render

    def counting(policy, *args):
        calls.append(policy)
        return render_(policy, *args)

    r.sync.render = counting
    return calls


def test_restart_adopts_on_the_remembered_fingerprint_without_rendering():
    fb = FakeBackend(namespaces={"/run/netns/a", "/run/netns/b"})
    saved = _saved_after_first_run(fb, sandbox("a", rev=3, deny_out=["192.0.2.1"]), sandbox("b", rev=1))
    rendered = {
        "a": render(sandbox("a", deny_out=["192.0.2.1"]).policy, CONFIG),
        "b": render(sandbox("b").policy, CONFIG),
    }
    assert saved["in_force"]["tables"] == {k: [rs.fingerprint, rs.shape] for k, rs in rendered.items()}
    writes = len(fb.writes)

    async def second(r, fb):
        r.sync.adopt_by_fingerprint = True
        assert restore_state(r, saved) == []
        renders = _count_renders(r)  # from here: the first pass
        await settle(r)
        assert r.status["a"].state == r.status["b"].state == "enforced" and r.status["a"].revision == 3
        assert renders == [] and r.counters["adopted"] == 2  # one fingerprint read each, nothing rendered
        r.sync.adopt_by_fingerprint = False
        r.resync()  # the verification pass renders and compares every table whole
        await settle(r)
        assert len(renders) == 2 and r.counters["unchanged"] == 2

    run(second, fb)
    assert len(fb.writes) == writes


def test_a_remembered_fingerprint_is_not_trusted_for_a_record_that_changed():
    """The kernel holds revision 1's table; the state file already says revision 2 (the agent died between
    taking the event and applying it). Revision 2 must be rendered and applied, not adopted as enforced."""
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = {}

    async def first(r, fb):
        r.upsert(sandbox("a", rev=1, allow_internet_access=False))
        await settle(r)
        r.upsert(sandbox("a", rev=2, deny_out=["192.0.2.7"]))
        saved.update(export_state(r)[0])  # before any worker took revision 2

    run(first, fb)
    assert saved["in_force"]["tables"] == {}

    async def second(r, fb):
        r.sync.adopt_by_fingerprint = True
        restore_state(r, saved)
        assert await r.wait_enforced("a", 2, 5)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.7"])

    run(second, fb)


def test_a_remembered_fingerprint_is_dropped_when_the_feed_sends_a_new_record():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = _saved_after_first_run(fb, sandbox("a", rev=1, allow_internet_access=False))

    async def second(r, fb):
        r.sync.adopt_by_fingerprint = True
        restore_state(r, saved)
        r.upsert(sandbox("a", rev=2, deny_out=["192.0.2.9"]))  # the feed's snapshot, before any worker ran
        assert await r.wait_enforced("a", 2, 5)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.9"])

    run(second, fb)


def test_remembered_fingerprints_of_another_config_are_ignored():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = _saved_after_first_run(fb, sandbox("a", allow_internet_access=False))
    other = config_from_dict({"guard": {"deny": ["192.0.2.0/24"]}})
    r = Reconciler(fb, other)
    restore_state(r, saved)
    assert r.sync.hints == {}
    r = Reconciler(fb, CONFIG)
    restore_state(r, saved)
    assert set(r.sync.hints) == {"a"}


def test_the_same_record_again_is_no_change():
    """A feed's snapshot after a restart repeats every record: no new generation, no state write, no
    reconcile queued for it."""
    marks = []

    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=4, deny_out=["192.0.2.1"]))
        await settle(r)
        gen, count = r.desired["a"].generation, len(marks)
        assert r.upsert(sandbox("a", rev=4, deny_out=["192.0.2.1"]))
        assert r.desired["a"].generation == gen and len(marks) == count and r.queue.idle()
        assert r.upsert(sandbox("a", rev=5, deny_out=["192.0.2.1"]))
        assert r.desired["a"].generation > gen

    run(scenario, persist=lambda: marks.append(1))


def test_a_namespace_freed_by_a_delete_can_be_taken_by_another_sandbox():
    async def scenario(r, fb):
        r.upsert(sandbox("a", netns="/run/netns/c", allow_internet_access=False))
        assert not r.upsert(sandbox("b", netns="/run/netns/c"))
        r.delete("a")
        assert r.upsert(sandbox("b", netns="/run/netns/c", deny_out=["192.0.2.3"]))
        assert await r.wait_enforced("b", None, 5)
        assert fb.fingerprint("/run/netns/c") == fp(deny_out=["192.0.2.3"])
        r.upsert(sandbox("b", netns="/run/netns/a", deny_out=["192.0.2.3"]))  # b moves on: c is free again
        assert r.upsert(sandbox("c", netns="/run/netns/c"))

    run(scenario)


def test_eventual_state_writes_are_spaced_by_how_long_a_write_takes(tmp_path, monkeypatch):
    """A state file that takes long to write is written less often: a burst of applies at 10,000 sandboxes
    rewrote a 3.5 MB file after nearly every one of them."""
    import time

    from egressd.agent import persister
    from egressd.desired.statefile import StateFile

    saved = []

    def slow_save(doc):
        time.sleep(0.02)
        saved.append(doc)

    state = StateFile(tmp_path)
    monkeypatch.setattr(state, "save", slow_save)

    async def main():
        p = persister.Persister(state, lambda: ({"n": len(saved)}, 0), lambda g: None)
        p.mark()
        await asyncio.sleep(0.1)
        assert len(saved) == 1 and p.last_write_s >= 0.02
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        p.mark()
        while len(saved) < 2:
            await asyncio.sleep(0.01)
        assert loop.time() - t0 >= persister.PERSIST_SPACING * 0.02 * 0.9  # about 0.4 s, not 0.05 s
        await p.flush()  # flush() itself never waits: a reconcile that needs the state on disk calls it

    asyncio.run(main())


def _allow4(table):
    """The allow4 set of the variant in force (after a write completes only one variant exists)."""
    return next(
        c["add"]["set"] for c in table if c["add"].get("set", {}).get("name") in ("allow4_a", "allow4_b")
    )


def test_an_address_swapped_in_place_is_repaired_though_the_shape_is_the_same():
    """Digests leave set elements out (one digest per shape); the elements are compared on their own."""

    async def scenario(r, fb):
        r.upsert(sandbox(allow_internet_access=False, allow_out=["192.0.2.1", "198.51.100.0/24"]))
        await settle(r)
        table = fb.tables["/run/netns/a"]
        _allow4(table)["elem"] = ["192.0.2.1", {"prefix": {"addr": "203.0.113.0", "len": 24}}]
        r.resync()
        await settle(r)
        assert r.counters["repaired"] == 1
        assert _allow4(fb.tables["/run/netns/a"])["elem"] == [
            "192.0.2.1",
            {"prefix": {"addr": "198.51.100.0", "len": 24}},
        ]

    run(scenario)


def test_objects_planted_in_a_table_go_with_its_repair_which_is_done_once():
    """A chain, a set and a counter of someone else's names in egressd's table: the repair removes them in
    its switch, so the next resync finds the table as written (no repair at every resync)."""

    async def scenario(r, fb):
        r.upsert(sandbox(allow_internet_access=False, allow_out=["192.0.2.1"]))
        await settle(r)
        t = {"family": "inet", "table": "egressd"}
        planted = [
            {"add": {"chain": {**t, "name": "planted"}}},
            {"add": {"set": {**t, "name": "planted4", "type": "ipv4_addr"}}},
            {"add": {"counter": {**t, "name": "planted_counter"}}},
            {"add": {"rule": {**t, "chain": "planted", "expr": [{"match": {"op": "==", "left": {
                "payload": {"protocol": "ip", "field": "daddr"}}, "right": "@planted4"}}, {"accept": None}]}}},
        ]  # fmt: skip
        fb.tables["/run/netns/a"] += planted
        r.resync()
        await settle(r)
        assert r.counters["repaired"] == 1
        names = {body.get("name") for c in fb.tables["/run/netns/a"] for body in c["add"].values()}
        assert not names & {"planted", "planted4", "planted_counter"}
        assert "denied" in names  # the control: egressd's own counter stays
        r.resync()
        await settle(r)
        assert r.counters["repaired"] == 1

    run(scenario)


def test_a_planted_chain_jumping_into_the_variant_in_force_cannot_freeze_the_policy():
    """A tenant's chain that jumps to one of the variant's chains (a logging chain, say) would make the
    retirement of that variant fail if it were deleted before the tenant's chain was emptied: every chain
    is emptied first, so the update (a tightening) goes through."""

    async def scenario(r, fb):
        r.upsert(sandbox(allow_internet_access=False, allow_out=["192.0.2.1"]))
        await settle(r)
        t = {"family": "inet", "table": "egressd"}
        jump = {"jump": {"target": "log_internet_a"}}
        fb.tables["/run/netns/a"] += [
            {"add": {"chain": {**t, "name": "evil"}}},
            {"add": {"rule": {**t, "chain": "evil", "expr": [jump]}}},
        ]
        r.upsert(sandbox(rev=2, allow_internet_access=False, allow_out=["192.0.2.2"]))
        await settle(r)
        assert await r.wait_enforced("a", 2, 5)
        names = {body.get("name") for c in fb.tables["/run/netns/a"] for body in c["add"].values()}
        assert "evil" not in names and "log_internet_b" in names

    run(scenario)


def test_digests_of_another_listing_form_are_learned_again_not_compared():
    """A state file from before the host side was listed over raw netlink holds digests of another form:
    compared, every table would look altered."""
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = _saved_after_first_run(fb, sandbox("a", allow_internet_access=False, allow_out=["192.0.2.1"]))
    assert saved["digests"] and saved["digest_form"] == LISTING_FORM
    older = {k: v for k, v in saved.items() if k != "digest_form"}

    async def restored(r, fb, doc, expect):
        restore_state(r, doc)
        assert bool(r.sync.digests) is expect

    run(lambda r, fb: restored(r, fb, saved, True), fb)
    run(lambda r, fb: restored(r, fb, older, False), fb)


def test_a_table_with_the_right_fingerprint_but_other_addresses_is_not_adopted():
    fb = FakeBackend(namespaces={"/run/netns/a"})
    saved = _saved_after_first_run(fb, sandbox("a", allow_internet_access=False, allow_out=["192.0.2.1"]))
    _allow4(fb.tables["/run/netns/a"])["elem"] = ["192.0.2.1", "203.0.113.9"]  # added while no agent ran
    saved["digests"] = {}  # a state file that never learnt this shape: the first read must not adopt it

    async def second(r, fb):
        restore_state(r, saved)
        await settle(r)
        assert r.counters["repaired"] == 1 and r.counters["adopted"] == 0
        assert _allow4(fb.tables["/run/netns/a"])["elem"] == ["192.0.2.1"]

    run(second, fb)


def test_elements_are_compared_as_addresses_however_they_are_printed():
    rs = render(sandbox(allow_out=["198.51.100.0/24", "2001:db8::/48", "192.0.2.7"]).policy, CONFIG)
    listing = [c["add"] for c in create_commands(rs) if "set" in c["add"]]
    assert elements_differ(listing, rs) is None
    allow4 = next(i["set"] for i in listing if i["set"]["name"] == "allow4_a")
    allow4["elem"] = [
        {"range": ["198.51.100.0", "198.51.100.255"]},
        {"prefix": {"addr": "192.0.2.7", "len": 32}},
    ]
    assert elements_differ(listing, rs) is None  # the same addresses, printed otherwise
    allow4["elem"] = [{"range": ["198.51.100.0", "198.51.100.254"]}, "192.0.2.7"]
    assert elements_differ(listing, rs) == "set allow4 holds other addresses than the policy's"
    allow4["elem"] = ["198.51.100.0/24", "192.0.2.7", "192.0.2.8"]
    assert elements_differ(listing, rs) is not None
    allow4["elem"] = [{"weird": 1}, "192.0.2.7"]
    assert elements_differ(listing, rs) is not None


# --- snapshots from an authoritative source, closed sandboxes -------------------------------------------


def _snapshot(*records, authoritative=False):
    snap = parse_event({"type": "snapshot", "sandboxes": list(records)})
    return dataclasses.replace(snap, authoritative=authoritative)


def test_a_namespace_passed_from_an_unlisted_sandbox_to_a_listed_one_is_accepted():
    async def scenario(r, fb):
        r.upsert(sandbox("a", netns="/run/netns/c", allow_internet_access=False))
        await settle(r)
        r.snapshot(_snapshot(record("b", netns="/run/netns/c", deny_out=["192.0.2.9"])))
        await settle(r)
        assert sorted(r.desired) == ["b"]
        assert r.desired["b"].netns == "/run/netns/c" and r.desired["b"].problem is None
        assert r.status["b"].error is None
        assert fb.fingerprint("/run/netns/c") == fp(deny_out=["192.0.2.9"])

    run(scenario)


def test_a_namespace_passed_to_a_sandbox_listed_as_invalid_closes_it_there():
    async def scenario(r, fb):
        r.upsert(sandbox("a", netns="/run/netns/c"))
        r.snapshot(_snapshot(record("b", rev=1, netns="/run/netns/c", deny_out=["300.0.0.1"])))
        assert sorted(r.desired) == ["b"]
        assert r.desired["b"].netns == "/run/netns/c" and r.desired["b"].problem.startswith(
            "closed (deny-all)"
        )
        await settle(r)
        assert fb.fingerprint("/run/netns/c") == render(DENY_ALL, CONFIG).fingerprint

    run(scenario)


def test_an_authoritative_snapshot_takes_records_whatever_their_revision():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=50, allow_internet_access=False))
        r.snapshot(_snapshot(record("a", rev=3, deny_out=["192.0.2.1"])))
        assert r.desired["a"].revision == 50  # not authoritative: an older record is stale
        r.snapshot(_snapshot(record("a", rev=3, deny_out=["192.0.2.1"]), authoritative=True))
        assert r.desired["a"].revision == 3
        assert await r.wait_enforced("a", 3, 5)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.1"])

    run(scenario)


def test_an_authoritative_snapshot_takes_an_older_invalid_record_too():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=50))
        r.snapshot(_snapshot(record("a", rev=3, deny_out=["300.0.0.1"])))
        assert r.desired["a"].problem is None
        r.snapshot(_snapshot(record("a", rev=3, deny_out=["300.0.0.1"]), authoritative=True))
        assert r.desired["a"].problem.startswith("revision 3 rejected, still enforcing revision 50")
        assert r.desired["a"].policy == sandbox("a").policy  # the last good policy, still in force
        # The source counts from 3 now: its next good record (revision 4) is taken, not "stale" against 50.
        assert r.upsert(sandbox("a", rev=4, deny_out=["192.0.2.1"]))
        d = r.desired["a"]
        assert (
            d.revision == 4 and d.problem is None and d.policy == sandbox("a", deny_out=["192.0.2.1"]).policy
        )
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.1"])

    run(scenario)


def test_an_authoritative_snapshot_passes_its_latest_to_a_namespace_conflict():
    """A record that loses its namespace to another sandbox is rejected as of the snapshot's revision too."""

    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=50, netns="/run/netns/a"))
        r.upsert(sandbox("b", rev=60, netns="/run/netns/b"))
        snap = _snapshot(
            record("a", rev=3, netns="/run/netns/a"),
            record("b", rev=4, netns="/run/netns/a"),
            authoritative=True,
        )
        r.snapshot(snap)
        assert "already used by sandbox 'a'" in r.desired["b"].problem
        assert r.desired["b"].revision == 4  # lowered with the source's numbering
        assert r.upsert(sandbox("b", rev=5, netns="/run/netns/b"))
        assert r.desired["b"].problem is None and r.desired["b"].revision == 5

    run(scenario)


def test_an_authoritative_snapshot_clears_the_tombstones():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=9))
        r.upsert(sandbox("b", rev=9))
        r.delete("a")
        assert r.tombstones == {"a": 9}
        r.snapshot(_snapshot(record("c", rev=1)))
        assert "b" in r.tombstones  # a plain snapshot remembers what it forgot
        r.snapshot(_snapshot(record("c", rev=1), authoritative=True))
        assert not r.tombstones
        assert r.upsert(sandbox("a", rev=1)) and r.desired["a"].revision == 1  # a bucket made anew

    run(scenario)


def _reject(sid, rev, netns=None, **np):
    rec = {"id": sid, "revision": rev, "network_policy": np or {"deny_out": ["300.0.0.1"]}}
    if netns is not None:
        rec["netns"] = netns
    try:
        parse_sandbox(rec)
    except PolicyError as e:
        return e
    raise AssertionError("the record was valid")


def test_a_closed_sandbox_moves_to_the_namespace_a_later_bad_record_names():
    async def scenario(r, fb):
        r.reject(_reject("a", 1, "/run/netns/a"))
        assert r.desired["a"].netns == "/run/netns/a"
        r.reject(_reject("a", 2, "/run/netns/b"))
        d = r.desired["a"]
        assert d.netns == "/run/netns/b" and d.revision == 2 and d.policy == DENY_ALL
        assert d.problem.startswith("closed (deny-all): ")
        await settle(r)
        assert fb.fingerprint("/run/netns/b") == render(DENY_ALL, CONFIG).fingerprint
        assert fb.fingerprint("/run/netns/a") is None

    run(scenario)


def test_a_closed_sandbox_keeps_its_namespace_when_a_later_bad_record_names_none():
    async def scenario(r, fb):
        r.reject(_reject("a", 1, "/run/netns/a"))
        r.reject(_reject("a", 2))
        d = r.desired["a"]
        assert d.netns == "/run/netns/a" and d.revision == 2 and d.problem.startswith("closed (deny-all): ")
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == render(DENY_ALL, CONFIG).fingerprint

    run(scenario)


def test_a_closed_sandbox_does_not_move_into_a_namespace_another_holds():
    async def scenario(r, fb):
        r.upsert(sandbox("b"))
        r.reject(_reject("a", 1, "/run/netns/a"))
        r.reject(_reject("a", 2, "/run/netns/b"))
        assert r.desired["a"].netns == "/run/netns/a" and r.desired["b"].netns == "/run/netns/b"

    run(scenario)


def test_a_sandbox_that_had_a_good_record_keeps_it_whatever_bad_records_say():
    async def scenario(r, fb):
        r.upsert(sandbox("a", rev=1, deny_out=["192.0.2.1"]))
        r.reject(_reject("a", 2, "/run/netns/b"))
        r.reject(_reject("a", 3, "/run/netns/c"))
        d = r.desired["a"]
        assert (
            d.netns == "/run/netns/a"
            and d.revision == 1
            and d.policy == sandbox("a", deny_out=["192.0.2.1"]).policy
        )
        assert d.problem.startswith("revision 3 rejected, still enforcing revision 1")
        await settle(r)
        assert fb.fingerprint("/run/netns/a") == fp(deny_out=["192.0.2.1"])
        assert fb.fingerprint("/run/netns/b") is None and fb.fingerprint("/run/netns/c") is None

    run(scenario)
