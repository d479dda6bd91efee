"""The DNS proxy's decisions without root: one query in, one reply out, against the fake kernel and a scripted
upstream. What must hold: nothing refused is ever asked upstream, learned addresses are in the kernel before
the reply is handed back, a failed write is SERVFAIL, and the reply never outlives what was learned."""

import asyncio
import time

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rrset
import pytest

from egressd.intercept.messages import (
    QueryError,
    learned,
    parse_query,
    sandbox_reply,
    to_wire,
    upstream_query,
)
from egressd.intercept.service import Interceptor, Sandbox
from egressd.intercept.site import TokenBucket
from egressd.kernel.backend import ApplyError
from egressd.kernel.fake import FakeBackend
from egressd.model.config import config_from_dict
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render

NS = "/run/netns/a"
CONFIG = config_from_dict({"dns": {"min_ttl": 5, "max_ttl": 60, "retention": 10, "max_learned": 16}})


def policy(**np):
    return parse_sandbox({"id": "a", "network_policy": np}).policy


def answer_for(query_msg, *records, rcode=0):
    """An upstream reply to the rebuilt question: records are (owner, ttl, type, *values)."""
    out = dns.message.make_response(query_msg)
    out.set_rcode(rcode)
    for owner, ttl, rdtype, *values in records:
        out.answer.append(dns.rrset.from_text(owner, ttl, "IN", rdtype, *values))
    return out


class Upstream:
    def __init__(self, records):
        self.records = records  # name -> list of records for answer_for
        self.asked = []

    async def __call__(self, question):
        msg = dns.message.from_wire(question)
        name = msg.question[0].name.to_text(omit_final_dot=True).lower()
        self.asked.append(name)
        assert msg.edns == 0 and not msg.options  # the question alone: the sandbox's EDNS option stays home
        assert msg.flags & ~dns.flags.CD == dns.flags.RD
        out = answer_for(msg, *self.records.get(name, []), rcode=0 if name in self.records else 3)
        return out.to_wire()


def world(pol, records, fail=None):
    fb = FakeBackend(namespaces={NS}, fail=fail)
    fb.apply(NS, render(pol, CONFIG))
    up = Upstream(records)

    async def run(fn, *args):
        return fn(*args)

    proxy = Interceptor(CONFIG, fb, None, run, forward=up)
    proxy.sandboxes["a"] = Sandbox(NS, pol, None)
    return proxy, fb, up


def ask(proxy, name, rdtype="A"):
    q = dns.message.make_query(name, rdtype, use_edns=0, options=[dns.edns.GenericOption(65001, b"c2VjcmV0")])
    wire = asyncio.run(proxy.answer("a", q.to_wire(), 0))
    r = dns.message.from_wire(wire)
    assert r.id == q.id
    return r


def learned_set(fb, name="learned4", where=NS):
    table = fb.tables[where]
    (s,) = [c["add"]["set"] for c in table if c["add"].get("set", {}).get("name") == name]
    return {e["elem"]["val"]: e["elem"]["timeout"] for e in s.get("elem", [])}


def test_an_allowed_answer_is_learned_before_it_is_handed_back():
    pol = policy(allow_internet_access=False, allow_out=["pypi.org"])
    proxy, fb, up = world(
        pol,
        {"pypi.org": [("pypi.org.", 300, "CNAME", "d.cdn.test."), ("d.cdn.test.", 3, "A", "198.51.100.7")]},
    )
    r = ask(proxy, "PyPI.org")
    assert r.rcode() == dns.rcode.NOERROR and up.asked == ["pypi.org"]
    assert learned_set(fb) == {"198.51.100.7": 5 + 10}  # TTL 3 clamped up to min_ttl, plus retention
    assert all(rrset.ttl <= 60 for rrset in r.answer)  # capped at max_ttl (the CNAME said 300)
    assert proxy.counts["forwarded"] == 1


def test_refused_and_denied_names_never_leave_and_learn_nothing():
    pol = policy(allow_internet_access=False, allow_out=["*.example.test"], deny_out=["bad.example.test"])
    proxy, _, up = world(pol, {})
    assert ask(proxy, "exfil-c2VjcmV0.other.test", "TXT").rcode() == dns.rcode.REFUSED
    assert ask(proxy, "example.test").rcode() == dns.rcode.REFUSED  # the apex is not under the pattern
    assert up.asked == [] and proxy.counts["refused"] == 2
    # allow_out wins: *.example.test allows bad.example.test although deny_out names it
    up.records["bad.example.test"] = [("bad.example.test.", 30, "A", "203.0.113.9")]
    assert ask(proxy, "bad.example.test").rcode() == dns.rcode.NOERROR


def test_a_cname_into_a_denied_name_is_nxdomain_and_learns_nothing():
    pol = policy(allow_internet_access=True, allow_out=["ok.test"], deny_out=["*.evil.test"])
    records = {
        "ok.test": [("ok.test.", 30, "CNAME", "x.evil.test."), ("x.evil.test.", 30, "A", "203.0.113.66")]
    }
    proxy, fb, _ = world(pol, records)
    assert ask(proxy, "ok.test").rcode() == dns.rcode.NXDOMAIN
    assert learned_set(fb) == {} and proxy.counts["nxdomain"] == 1


def test_a_failed_kernel_write_is_servfail_never_an_unusable_answer():
    pol = policy(allow_internet_access=False, allow_out=["a.test"])
    fail = {"on": False}
    proxy, fb, _ = world(
        pol,
        {"a.test": [("a.test.", 30, "A", "198.51.100.1")]},
        fail=lambda ns, op: ApplyError("injected") if op == "learn" and fail["on"] else None,
    )
    fail["on"] = True
    assert ask(proxy, "a.test").rcode() == dns.rcode.SERVFAIL and proxy.counts["servfail"] == 1
    assert learned_set(fb) == {}
    fail["on"] = False
    assert ask(proxy, "a.test").rcode() == dns.rcode.NOERROR and learned_set(fb) == {"198.51.100.1": 40}


def test_only_growing_timeouts_are_written_and_a_full_sandbox_fails_closed():
    pol = policy(allow_internet_access=False, allow_out=["*.pool.test"])
    records = {f"n{i}.pool.test": [(f"n{i}.pool.test.", 30, "A", f"198.51.100.{i}")] for i in range(20)}
    proxy, fb, _ = world(pol, records)
    ask(proxy, "n0.pool.test")
    writes = len(fb.writes)
    ask(proxy, "n0.pool.test")  # the same address, no longer: nothing written
    assert len(fb.writes) == writes
    for i in range(1, 16):
        assert ask(proxy, f"n{i}.pool.test").rcode() == dns.rcode.NOERROR
    assert ask(proxy, "n16.pool.test").rcode() == dns.rcode.SERVFAIL  # max_learned = 16
    assert len(learned_set(fb)) == 16


def test_an_address_answered_again_is_written_again_once_a_tenth_of_the_retention_has_passed():
    pol = policy(allow_internet_access=False, allow_out=["a.test"])
    proxy, fb, _ = world(pol, {"a.test": [("a.test.", 30, "A", "198.51.100.1")]})
    proxy.config = config_from_dict({"dns": {"min_ttl": 5, "max_ttl": 60, "retention": 600}})  # slack 60 s
    ask(proxy, "a.test")
    assert learned_set(fb) == {"198.51.100.1": 630}
    writes, expiry = len(fb.writes), proxy.sandboxes["a"].expiry
    expiry["198.51.100.1"] -= 50  # as if 50 s had passed: 580 s left, the answer would make it 630
    ask(proxy, "a.test")
    assert len(fb.writes) == writes  # 50 s more is less than 60: not written
    expiry["198.51.100.1"] -= 20  # 70 s
    ask(proxy, "a.test")
    assert len(fb.writes) == writes + 1 and learned_set(fb) == {"198.51.100.1": 630}


def test_rebinding_addresses_are_neither_learned_nor_answered():
    pol = policy(allow_internet_access=False, allow_out=["meta.test"])
    records = {"meta.test": [("meta.test.", 30, "A", "169.254.169.254", "198.51.100.5")]}
    proxy, fb, _ = world(pol, records)
    r = ask(proxy, "meta.test")
    assert [str(x) for rrset in r.answer for x in rrset] == ["198.51.100.5"]
    assert learned_set(fb) == {"198.51.100.5": 40}


def test_queries_the_proxy_does_not_answer():
    with pytest.raises(QueryError) as e:
        parse_query(b"\x00\x01garbage")
    assert e.value.reply is None  # not DNS: nothing is sent
    odd = dns.message.make_query(dns.name.Name([b"a.b", b"example", b"test", b""]), "A")
    with pytest.raises(QueryError) as e:
        parse_query(odd.to_wire())  # a dot inside a label: it could pass for a.b.example.test
    assert e.value.reply.rcode() == dns.rcode.REFUSED


def test_a_reply_too_big_for_udp_is_truncated_for_a_retry_over_tcp():
    q = parse_query(dns.message.make_query("many.test", "A").to_wire())
    up = answer_for(upstream_query(q), ("many.test.", 30, "A", *[f"198.51.100.{i}" for i in range(60)]))
    reply = sandbox_reply(q, up, learned(q, up), 60, ())
    short = dns.message.from_wire(to_wire(reply, q.payload))
    assert short.flags & dns.flags.TC and short.answer == []
    assert short.flags & dns.flags.RA  # without it glibc takes an empty answer for a referral: no TCP retry
    assert len(dns.message.from_wire(to_wire(reply, 65535)).answer[0]) == 60


def test_the_rate_limit_refills_over_time():
    bucket = TokenBucket(5)
    assert [bucket.take() for _ in range(6)] == [True] * 5 + [False]
    bucket.at -= 0.5  # half a second later: 2.5 tokens
    assert [bucket.take() for _ in range(3)] == [True, True, False]
    assert time.monotonic() >= bucket.at


def test_a_policy_that_allows_fewer_names_keeps_only_their_learned_addresses():
    """Before the new table (and generation) is written: no connection to an address only the old policy
    allowed can be re-marked by it."""
    from egressd.kernel.dnssock import ProxySockets
    from egressd.kernel.netns import netns_id

    here = "/proc/self/ns/net"  # a namespace path that exists: the proxy's sockets are a stub
    fb = FakeBackend(namespaces={here})
    both = policy(allow_internet_access=False, allow_out=["*.a.test", "*.b.test"])
    fb.apply(here, render(both, CONFIG))
    up = Upstream(
        {
            "x.a.test": [("x.a.test.", 30, "A", "198.51.100.1")],
            "y.b.test": [("y.b.test.", 30, "A", "198.51.100.2")],
        }
    )

    async def run(fn, *args):
        return fn(*args)

    proxy = Interceptor(
        CONFIG, fb, None, run, open_sockets=lambda p, port: ProxySockets([], [], netns_id(p)), forward=up
    )

    async def scenario():
        await proxy.ensure("a", here, both, None)
        for name in ("x.a.test", "y.b.test"):
            q = dns.message.make_query(name, "A")
            assert dns.message.from_wire(await proxy.answer("a", q.to_wire(), 0)).rcode() == dns.rcode.NOERROR
        assert set(learned_set(fb, where=here)) == {"198.51.100.1", "198.51.100.2"}
        await proxy.ensure("a", here, policy(allow_internet_access=False, allow_out=["*.a.test"]), None)
        assert set(learned_set(fb, where=here)) == {"198.51.100.1"}
        await proxy.ensure("a", here, policy(allow_internet_access=False, allow_out=["*.c.test"]), None)
        assert learned_set(fb, where=here) == {}
        proxy.close()

    asyncio.run(scenario())


def test_a_restarted_proxy_takes_learned_times_from_the_kernel_and_never_shortens_them():
    from egressd.kernel.dnssock import ProxySockets
    from egressd.kernel.netns import netns_id

    here = "/proc/self/ns/net"
    fb = FakeBackend(namespaces={here})
    pol = policy(allow_internet_access=False, allow_out=["a.test"])
    fb.apply(here, render(pol, CONFIG))
    fb.learn(here, {"198.51.100.1": 500})  # what the agent before the restart wrote
    up = Upstream({"a.test": [("a.test.", 30, "A", "198.51.100.1")]})

    async def run(fn, *args):
        return fn(*args)

    stub = lambda p, port: ProxySockets([], [], netns_id(p))  # noqa: E731
    proxy = Interceptor(CONFIG, fb, None, run, open_sockets=stub, forward=up)

    async def scenario():
        await proxy.ensure("a", here, pol, None)
        assert proxy.view("a")["learned"] == 1
        writes = len(fb.writes)
        q = dns.message.make_query("a.test", "A")
        assert dns.message.from_wire(await proxy.answer("a", q.to_wire(), 0)).rcode() == dns.rcode.NOERROR
        assert len(fb.writes) == writes  # 30 s + retention is shorter than what the kernel holds: no write
        assert learned_set(fb, where=here) == {"198.51.100.1": 500}
        proxy.close()

    asyncio.run(scenario())


class Elements:
    """Stands in for the netlink socket made with a sandbox's listeners (kernel/nfnl_elements.py)."""

    def __init__(self, refuse=False):
        self.writes = []
        self.refuse = refuse
        self.closed = False

    def read(self, family, table, sets):
        return {"192.0.2.200": 50}  # what a proxy before the restart learned

    def learn(self, family, table, sets, timeouts):
        if self.refuse:
            raise ApplyError("the kernel refused the learned addresses: No such file or directory")
        self.writes.append((family, table, sets, dict(timeouts)))

    def close(self):
        self.closed = True


def test_answers_go_over_the_sandboxs_own_netlink_socket_in_the_loop_and_it_closes_with_the_sandbox():
    from egressd.kernel.dnssock import ProxySockets
    from egressd.kernel.netns import netns_id

    here = "/proc/self/ns/net"
    fb = FakeBackend(namespaces={here})
    pol = policy(allow_internet_access=False, allow_out=["a.test", "b.test"])
    fb.apply(here, render(pol, CONFIG))
    up = Upstream(
        {"a.test": [("a.test.", 30, "A", "198.51.100.1")], "b.test": [("b.test.", 30, "A", "192.0.2.9")]}
    )
    elements = Elements()
    ran = []

    async def run(fn, *args):
        ran.append(getattr(fn, "__name__", fn))
        return fn(*args)

    stub = lambda p, port: ProxySockets([], [], netns_id(p), elements)  # noqa: E731
    proxy = Interceptor(CONFIG, fb, None, run, open_sockets=stub, forward=up)

    async def scenario():
        await proxy.ensure("a", here, pol, None)
        assert proxy.view("a")["learned"] == 1 and "_open_site" in ran  # read with the sockets made
        assert learned_set(fb, where=here) == {}  # from the kernel over the socket, not the backend
        ran.clear()
        q = dns.message.make_query("a.test", "A")
        assert dns.message.from_wire(await proxy.answer("a", q.to_wire(), 0)).rcode() == dns.rcode.NOERROR
        assert elements.writes == [("inet", "egressd", ("learned4", "learned6"), {"198.51.100.1": 30 + 10})]
        assert ran == [] and learned_set(fb, where=here) == {}  # not through a worker, not the backend
        elements.refuse = True  # a table gone behind the proxy's back: SERVFAIL, nothing remembered
        q = dns.message.make_query("b.test", "A")
        assert dns.message.from_wire(await proxy.answer("a", q.to_wire(), 0)).rcode() == dns.rcode.SERVFAIL
        assert proxy.learned("a", "192.0.2.9") is None and proxy.learned("a", "198.51.100.1") is not None
        await proxy.release("a")
        assert elements.closed and "close" in ran  # closed off the loop: that close may wait in the kernel

    asyncio.run(scenario())
