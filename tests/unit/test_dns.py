"""The DNS cache's rules, and the reconciler driven by it, without a network (a scripted resolver)."""

import asyncio
import random
import time

import pytest

from egressd.desired.dnscache import GIVE_UP_AFTER, RDTYPES, Answer, DnsCache, rdtype_of
from egressd.desired.resolve import DnsService
from egressd.kernel.fake import FakeBackend
from egressd.model.config import config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.reconcile.reconciler import Reconciler
from egressd.reconcile.restart import export_state, restore_state


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def cache(**kw):
    clock = Clock()
    args = {"min_ttl": 5, "max_ttl": 300, "retention": 600} | kw
    return DnsCache(**args, clock=clock, rng=random.Random(3)), clock


def test_subscriptions_are_shared_and_released():
    c, _ = cache()
    assert c.subscribe("a", ["x.test", "y.test"]) == {"x.test", "y.test"}
    assert c.subscribe("b", ["x.test"]) == set()  # already in the cache: no new query
    assert c.subscribers["x.test"] == {"a", "b"}
    c.subscribe("a", [])
    assert set(c.names) == {"x.test"} and c.subscribers["x.test"] == {"b"}


def feed(c, name, kind, addresses=(), ttl=0.0, error=None, types=RDTYPES):
    """One answer of each type in types, each type given the addresses of its family; True when any changed
    what the name stands for."""
    changed = False
    for rdtype in types:
        mine = tuple(a for a in addresses if rdtype_of(a) == rdtype)
        changed |= c.record(name, rdtype, Answer(kind, mine, ttl, error))
    return changed


REFUSED = "no nameserver answered: REFUSED from 198.51.100.53"


def test_ttl_is_clamped_and_refresh_is_jittered_before_expiry():
    c, clock = cache()
    c.subscribe("a", ["x.test", "y.test"])
    feed(c, "x.test", "ok", ["198.51.100.1"], ttl=1)
    feed(c, "y.test", "ok", ["198.51.100.2"], ttl=10_000)
    x, y = c.names["x.test"].types["A"], c.names["y.test"].types["A"]
    assert x.ttl == 5 and y.ttl == 300
    assert clock.now + 4.5 <= x.next_refresh <= clock.now + 5
    assert c.due() == []
    clock.now += 5
    assert sorted(c.due()) == [("x.test", "A"), ("x.test", "AAAA")]


def test_round_robin_answers_are_retained_then_expire():
    c, clock = cache(retention=60)
    c.subscribe("a", ["x.test"])
    assert feed(c, "x.test", "ok", ["198.51.100.1"], ttl=30)
    clock.now += 30
    assert feed(c, "x.test", "ok", ["198.51.100.2"], ttl=30)
    assert c.addresses("x.test") == {"198.51.100.1", "198.51.100.2"}
    clock.now += 29  # .1 was last seen 59 s ago
    assert c.expire() == set()
    clock.now += 2
    assert c.expire() == {"x.test"}
    assert c.addresses("x.test") == {"198.51.100.2"}


def test_servfail_keeps_the_last_addresses_past_retention():
    c, clock = cache(retention=10)
    c.subscribe("a", ["x.test"])
    feed(c, "x.test", "ok", ["198.51.100.1", "2001:db8::1"], ttl=5)
    clock.now += 100
    assert not feed(c, "x.test", "error", error="SERVFAIL from 198.51.100.53")
    assert c.expire() == set()
    assert c.addresses("x.test") == {"198.51.100.1", "2001:db8::1"}
    st = c.names["x.test"]
    assert st.error.startswith("SERVFAIL") and st.types["A"].next_refresh <= clock.now + 1
    assert c.view("x.test")["state"] == "failing"


def test_nxdomain_contributes_nothing_once_retention_expires():
    c, clock = cache(retention=10)
    c.subscribe("a", ["x.test"])
    feed(c, "x.test", "ok", ["198.51.100.1"], ttl=5)
    clock.now += 5
    feed(c, "x.test", "nxdomain")
    assert c.addresses("x.test") == {"198.51.100.1"}  # still within retention
    clock.now += 11
    assert c.expire() == {"x.test"}
    assert c.addresses("x.test") == set() and c.view("x.test")["error"] == "NXDOMAIN: no such name"


def test_a_name_settles_when_it_resolves_or_fails_for_good():
    c, _ = cache()
    c.subscribe("a", ["ok.test", "nx.test", "down.test", "empty.test"])
    assert not c.settled("ok.test")
    feed(c, "ok.test", "ok", ["198.51.100.1"], ttl=5)
    feed(c, "nx.test", "nxdomain")
    feed(c, "empty.test", "ok")
    assert c.settled("ok.test") and c.settled("nx.test") and c.settled("empty.test")
    assert c.view("empty.test")["error"] == "no A or AAAA records"
    for i in range(GIVE_UP_AFTER):
        assert not c.settled("down.test")
        changed = feed(c, "down.test", "error", error="timeout")
        assert changed == (i == GIVE_UP_AFTER - 1)
    assert c.settled("down.test") and c.view("down.test")["state"] == "failed"


def test_one_type_refused_never_throws_away_the_other_types_answer():
    c, clock = cache(retention=10)
    c.subscribe("a", ["v4.test", "v6.test"])
    # the A answer is used the moment it comes; the name settles once the AAAA query has come back at
    # all, refused or not (a wait that ended on the A answer alone would let AAAA's addresses come late)
    assert c.record("v4.test", "A", Answer("ok", ("198.51.100.1",), 30))
    assert c.addresses("v4.test") == {"198.51.100.1"} and not c.settled("v4.test")
    assert c.record("v4.test", "AAAA", Answer("error", error=REFUSED))  # True: it just settled
    assert c.addresses("v4.test") == {"198.51.100.1"} and c.settled("v4.test")
    v = c.view("v4.test")
    assert v["state"] == "failing" and v["error"] == f"AAAA: {REFUSED}"
    assert v["types"]["A"] | {"refresh_in": 0} == {
        "state": "resolved", "current": ["198.51.100.1"], "ttl": 30, "refresh_in": 0, "failures": 0,
        "error": None,
    }  # fmt: skip
    assert v["types"]["AAAA"]["state"] == "resolving" and v["types"]["AAAA"]["failures"] == 1
    # the failing type is retried with backoff, the other at its TTL
    assert c.names["v4.test"].types["AAAA"].next_refresh <= clock.now + 1
    assert c.names["v4.test"].types["A"].next_refresh >= clock.now + 27
    # the IPv6-only name, the other way round
    assert c.record("v6.test", "A", Answer("error", error=REFUSED)) is False
    assert c.record("v6.test", "AAAA", Answer("ok", ("2001:db8::1",), 30))
    assert c.addresses("v6.test") == {"2001:db8::1"} and c.settled("v6.test")
    assert c.view("v6.test")["error"] == f"A: {REFUSED}"


def test_a_failing_type_keeps_its_own_addresses_while_the_others_expire():
    c, clock = cache(retention=10)
    c.subscribe("a", ["x.test"])
    feed(c, "x.test", "ok", ["198.51.100.1", "2001:db8::1"], ttl=5)
    clock.now += 5
    c.record("x.test", "A", Answer("ok", ("198.51.100.2",), 5))
    c.record("x.test", "AAAA", Answer("error", error="timeout: no answer from the nameservers"))
    clock.now += 11
    assert c.expire() == {"x.test"}
    assert c.addresses("x.test") == {"198.51.100.2", "2001:db8::1"}  # A's old one expired; AAAA's is kept
    assert c.held_since("x.test", "2001:db8::1") == (16.0, True)
    assert c.held_since("x.test", "198.51.100.1") is None


def test_an_empty_answer_beside_a_failing_type_waits_for_that_type():
    """Only addresses, NXDOMAIN, or every type answered or failed for good settle a name: an A query with no
    data beside a failing AAAA query may still be hiding the addresses a deny_out name stands for."""
    c, _ = cache()
    c.subscribe("a", ["x.test"])
    c.record("x.test", "A", Answer("ok"))
    for _ in range(GIVE_UP_AFTER - 1):
        c.record("x.test", "AAAA", Answer("error", error=REFUSED))
        assert not c.settled("x.test")
    assert c.record("x.test", "AAAA", Answer("error", error=REFUSED))  # the fifth: failed for good
    assert c.settled("x.test") and c.view("x.test")["state"] == "failing"
    # once settled it stays so: a later empty answer never closes the sandbox again
    c.record("x.test", "A", Answer("ok"))
    assert c.settled("x.test")


def test_the_first_answer_waits_for_the_other_type_to_come_back():
    """An allow_out name's `wait`, and a deny_out name's hold, end only once both types have come back:
    either order, addresses or not."""
    c, _ = cache()
    c.subscribe("a", ["x.test", "y.test"])
    assert c.record("x.test", "AAAA", Answer("ok", ("2001:db8::1",), 30))
    assert not c.settled("x.test")
    assert c.record("x.test", "A", Answer("ok", ("198.51.100.1",), 30))
    assert c.settled("x.test") and c.addresses("x.test") == {"198.51.100.1", "2001:db8::1"}
    c.record("y.test", "A", Answer("ok", ("198.51.100.2",), 30))
    assert not c.settled("y.test")
    assert c.record("y.test", "AAAA", Answer("ok"))  # no AAAA records: settled, nothing more
    assert c.settled("y.test") and c.addresses("y.test") == {"198.51.100.2"}


def test_nxdomain_of_one_type_settles_the_name():
    c, _ = cache()
    c.subscribe("a", ["x.test"])
    assert c.record("x.test", "AAAA", Answer("nxdomain"))
    assert c.settled("x.test") and c.addresses("x.test") == set()


def test_export_and_restore_keep_addresses_and_schedule():
    c, _ = cache()
    c.subscribe("a", ["x.test", "gone.test", "half.test"])
    feed(c, "x.test", "ok", ["198.51.100.1", "2001:db8::1"], ttl=50)
    feed(c, "gone.test", "ok", ["198.51.100.9"], ttl=50)
    c.record("half.test", "A", Answer("ok", ("198.51.100.3",), 50))
    doc = c.export()
    fresh, _ = cache()
    fresh.subscribe("a", ["x.test", "half.test"])
    fresh.restore(doc)
    assert fresh.addresses("x.test") == {"198.51.100.1", "2001:db8::1"} and fresh.settled("x.test")
    # its AAAA query had not come back: the addresses are kept, the wait is not over
    assert fresh.addresses("half.test") == {"198.51.100.3"} and not fresh.settled("half.test")
    assert "gone.test" not in fresh.names
    assert fresh.due() == [("half.test", "AAAA")]  # never answered: asked at once


def test_restore_reads_the_state_of_the_version_before_record_types_were_apart():
    c, _ = cache()
    c.subscribe("a", ["x.test", "bad.test"])
    now = time.time()
    seen = {"198.51.100.1": now - 5, "2001:db8::1": now - 5}
    old = {"seen": seen, "current": list(seen), "resolved": True, "ttl": 50, "next_refresh": now + 40}
    c.restore({"x.test": old, "bad.test": old | {"current": ["not an address"]}})
    assert c.names["x.test"].types["A"].current == {"198.51.100.1"}
    assert c.names["x.test"].types["AAAA"].current == {"2001:db8::1"}
    assert c.settled("x.test") and c.due() == [("bad.test", "A"), ("bad.test", "AAAA")]
    assert not c.settled("bad.test")  # a broken entry is resolved again, never trusted


# --- the reconciler with DNS --------------------------------------------------------------------------


class ScriptedResolver:
    """Answers from a dict the test changes; counts every resolution."""

    def __init__(self, answers):
        self.answers = answers
        self.down: set[tuple[str, str]] = set()  # (name, record type) pairs refused, whatever answers say
        self.calls: dict[tuple[str, str], int] = {}

    async def resolve(self, name, rdtype):
        self.calls[name, rdtype] = self.calls.get((name, rdtype), 0) + 1
        addrs = self.answers.get(name)
        if addrs == "down" or (name, rdtype) in self.down:
            return Answer("error", error="timeout: no answer from the nameservers")
        if addrs is None:
            return Answer("nxdomain")
        return Answer("ok", tuple(a for a in addrs if rdtype_of(a) == rdtype), ttl=0.2)


CONFIG = config_from_dict(
    {
        "reconcile": {"retry_initial": 0.01, "retry_max": 0.05},
        "dns": {"min_ttl": 0.2, "max_ttl": 0.2, "retention": 0.3},
    }
)


def run(scenario, answers, namespaces=20, backend=None):
    backend = backend or FakeBackend(namespaces={f"/run/netns/s{i}" for i in range(namespaces)})
    resolver = ScriptedResolver(answers)

    async def main():
        ref = []
        dns = DnsService(
            DnsCache(CONFIG.dns_min_ttl, CONFIG.dns_max_ttl, CONFIG.dns_retention),
            resolver,
            on_change=lambda names: ref[0].names_changed(names),
        )
        r = Reconciler(backend, CONFIG, dns=dns, rng=random.Random(1))
        ref.append(r)
        task = asyncio.create_task(dns.run())
        r.start()
        try:
            return await asyncio.wait_for(scenario(r, backend, resolver), 10)
        finally:
            task.cancel()
            await r.stop()

    return asyncio.run(main())


def sb(i, **np):
    return parse_sandbox({"id": f"s{i}", "netns": f"/run/netns/s{i}", "network_policy": np})


async def until(pred, timeout=3.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


def test_allow_host_addresses_follow_dns_by_difference():
    answers = {"api.test": ["198.51.100.1", "2001:db8::1"]}

    async def scenario(r, fb, res):
        r.upsert(sb(0, allow_internet_access=False, allow_out=["api.test"]))
        await until(lambda: r.is_enforced("s0", None))
        assert fb.elements["/run/netns/s0"] == {"allow_dns4": {"198.51.100.1"}, "allow_dns6": {"2001:db8::1"}}
        applies = fb.writes.count(("apply", "/run/netns/s0"))
        answers["api.test"] = ["198.51.100.2", "2001:db8::1"]
        await until(lambda: "198.51.100.2" in fb.elements["/run/netns/s0"]["allow_dns4"])
        # retention keeps the old one a little, then it goes: both by element updates, never a rewrite
        await until(lambda: fb.elements["/run/netns/s0"]["allow_dns4"] == {"198.51.100.2"})
        assert fb.writes.count(("apply", "/run/netns/s0")) == applies
        assert ("update", "/run/netns/s0") in fb.writes and r.counters["dns_updated"] >= 2

    run(scenario, answers)


def test_deny_host_keeps_the_sandbox_closed_until_it_resolves():
    answers = {"bad.test": "down"}

    async def scenario(r, fb, res):
        r.upsert(sb(0, deny_out=["bad.test"]))
        await until(lambda: "s0" in r.status)
        assert (
            r.status["s0"].state == "pending"
            and "closed until deny_out hosts resolve: bad.test" in r.status["s0"].error
        )
        decide = [
            c["add"]["rule"]["expr"]
            for c in fb.tables["/run/netns/s0"]
            if c["add"].get("rule", {}).get("chain") == "decide_a"
        ]
        assert decide[-1] == [{"jump": {"target": "log_internet_a"}}]  # internet treated as off
        answers["bad.test"] = ["203.0.113.7"]
        await until(lambda: r.is_enforced("s0", None))
        decide = [
            c["add"]["rule"]["expr"]
            for c in fb.tables["/run/netns/s0"]
            if c["add"].get("rule", {}).get("chain") == "decide_b"  # the update switched to variant b
        ]
        assert decide[-1] == [{"goto": {"target": "admit_b"}}]  # accepts
        assert fb.elements["/run/netns/s0"]["deny_dns4"] == {"203.0.113.7"}

    run(scenario, answers)


def test_a_deny_name_with_one_type_refused_releases_the_sandbox_on_the_others_addresses():
    answers = {"bad.test": ["203.0.113.7"], "empty.test": []}

    async def scenario(r, fb, res):
        res.down |= {("bad.test", "AAAA"), ("empty.test", "AAAA")}
        r.upsert(sb(0, deny_out=["bad.test"]))
        r.upsert(sb(1, deny_out=["empty.test"]))
        await until(lambda: r.is_enforced("s0", None))
        assert fb.elements["/run/netns/s0"]["deny_dns4"] == {"203.0.113.7"}
        # no address at all yet, and one type failing: still closed (until it fails for good: 15 s)
        await asyncio.sleep(0.5)
        assert r.status["s1"].state == "pending" and "empty.test" in r.status["s1"].error
        # the failing type answers: its addresses join by difference, the table is not rewritten
        applies = fb.writes.count(("apply", "/run/netns/s0"))
        res.down.discard(("bad.test", "AAAA"))
        answers["bad.test"] = ["203.0.113.7", "2001:db8::7"]
        await until(lambda: fb.elements["/run/netns/s0"]["deny_dns6"] == {"2001:db8::7"}, timeout=4)
        assert fb.writes.count(("apply", "/run/netns/s0")) == applies

    run(scenario, answers)


def test_a_name_that_never_resolves_opens_after_failing_for_good():
    async def scenario(r, fb, res):
        r.upsert(sb(0, deny_out=["nowhere.test"]))
        await until(lambda: r.is_enforced("s0", None))
        assert res.calls["nowhere.test", "A"] == 1  # NXDOMAIN settles at once

    run(scenario, {})


def test_many_sandboxes_sharing_a_name_cost_one_resolution_per_refresh():
    answers = {"shared.test": ["198.51.100.1"]}

    async def scenario(r, fb, res):
        for i in range(20):
            r.upsert(sb(i, allow_internet_access=False, allow_out=["shared.test"]))
        await until(lambda: all(r.is_enforced(f"s{i}", None) for i in range(20)))
        await asyncio.sleep(1.0)
        # 0.2 s TTL, refreshed at 0.9-1.0 of it: about 5-6 resolutions a second, whatever the sandbox count
        assert 4 <= res.calls["shared.test", "A"] <= 8 and 4 <= res.calls["shared.test", "AAAA"] <= 8

    run(scenario, answers)


def test_only_sandboxes_naming_the_host_are_touched():
    answers = {"a.test": ["198.51.100.1"]}

    async def scenario(r, fb, res):
        r.upsert(sb(0, allow_out=["a.test"]))
        r.upsert(sb(1, deny_out=["198.51.100.0/24"]))
        await until(lambda: r.is_enforced("s0", None) and r.is_enforced("s1", None))
        before = [w for w in fb.writes if w[1] == "/run/netns/s1"]
        answers["a.test"] = ["198.51.100.3"]
        await until(lambda: "198.51.100.3" in fb.elements["/run/netns/s0"]["allow_dns4"])
        assert [w for w in fb.writes if w[1] == "/run/netns/s1"] == before

    run(scenario, answers)


def test_an_allowed_name_never_lets_through_guard_deny():
    answers = {"rebind.test": ["169.254.169.254", "198.51.100.1"]}

    async def scenario(r, fb, res):
        r.upsert(sb(0, allow_internet_access=False, allow_out=["rebind.test"]))
        await until(lambda: r.is_enforced("s0", None))
        assert fb.elements["/run/netns/s0"]["allow_dns4"] == {"198.51.100.1"}

    run(scenario, answers)


@pytest.mark.parametrize("addresses", [["198.51.100.1"], []])
def test_restart_with_the_saved_cache_adopts_without_writing(addresses):
    answers = {"api.test": addresses or None}
    fb = FakeBackend(namespaces={"/run/netns/s0"})
    saved = {}

    async def first(r, fb, res):
        r.upsert(sb(0, allow_out=["api.test"], deny_out=["api.test"]))
        await until(lambda: r.is_enforced("s0", None))
        saved.update(export_state(r)[0])

    run(first, answers, backend=fb)
    writes = len(fb.writes)

    async def second(r, fb, res):
        restore_state(r, saved)
        await until(lambda: r.is_enforced("s0", None))

    run(second, answers, backend=fb)
    assert len(fb.writes) == writes


def test_at_most_the_limit_is_asked_at_once_and_the_rest_wait_without_a_task_each():
    """A start with many names: every (name, type) is due at once. Only MAX_CONCURRENT_QUERIES of them are
    asked (a task each); the others wait in a queue, and every one is asked in the end."""
    from egressd.desired import resolve

    names = [f"n{i}.test" for i in range(3 * resolve.MAX_CONCURRENT_QUERIES)]
    gate = asyncio.Event()
    asking: list[int] = []

    class Held:
        active = 0

        async def resolve(self, name, rdtype):
            Held.active += 1
            asking.append(Held.active)
            await gate.wait()
            Held.active -= 1
            return Answer("ok", ("192.0.2.1",) if rdtype == "A" else (), ttl=60)

    async def main():
        dns = DnsService(DnsCache(60, 60, 60), Held(), on_change=lambda names: None)
        task = asyncio.create_task(dns.run())
        dns.subscribe("s0", names)
        await until(lambda: Held.active == resolve.MAX_CONCURRENT_QUERIES)
        await asyncio.sleep(0.05)
        refreshes = [t for t in asyncio.all_tasks() if t.get_coro().__name__ == "_refresh"]
        assert len(refreshes) == resolve.MAX_CONCURRENT_QUERIES  # not a task per due key
        assert max(asking) == resolve.MAX_CONCURRENT_QUERIES
        gate.set()
        await until(lambda: dns.queries == 2 * len(names))
        assert max(asking) == resolve.MAX_CONCURRENT_QUERIES  # never more, to the last
        task.cancel()

    asyncio.run(main())
