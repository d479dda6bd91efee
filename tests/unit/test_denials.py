"""The agent's denial events (agent/denials.py): one event per identical denial per second, with a count;
bounded; attributed to the entry; served to `egressd denials` (also as a long poll) and to `status`."""

import asyncio
import json

import pytest

from egressd.agent import denials as dn
from egressd.agent.denials import DenialBook
from egressd.agent.denialview import line
from egressd.kernel.nflog import LoggedPacket


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def packet(dst="198.51.100.7", prefix="deny_out", proto=6, dport=443, family=4):
    return LoggedPacket(family, prefix, proto, "10.0.0.2", dst, dport, None, None, 2, 60)


def book(clock, keep=100, published=None, known=lambda sid: True):
    calls = []

    def describe(sid, step, dst):
        calls.append((sid, step, dst))
        return ("198.51.100.0/24", "api.example.com") if step == "deny_out" else (None, None)

    publish = [published.append] if published is not None else []
    b = DenialBook(keep, describe, publish, wall=clock, known=known, clock=clock)
    return b, calls


def test_identical_denials_within_a_second_are_one_event_with_a_count_published_when_the_window_ends():
    clock, published = Clock(), []
    b, calls = book(clock, published=published)
    b.packets("sb1", [packet(), packet(), packet(dport=80)])
    clock.now += 0.5
    b.packets("sb1", [packet()])
    assert b.flush() == 0 and published == []  # the window is still open
    clock.now += 0.6
    assert b.flush() == 2
    by_port = {e.dport: e for e in published}
    assert by_port[443].count == 3 and by_port[80].count == 1
    assert by_port[443].entry == "198.51.100.0/24" and by_port[443].host == "api.example.com"
    assert len(calls) == 2  # attributed once per event, not per packet
    assert [e.seq for e in published] == [1, 2]
    # after the window a new one opens: the same denial again is a new event
    b.packets("sb1", [packet()])
    clock.now += 1.1
    b.flush()
    assert len(published) == 3 and published[-1].count == 1
    assert b.packets_by[("deny_out", "packet")] == 5


def test_windows_close_oldest_first_and_only_once_their_second_is_over():
    """Flushed in slices: the oldest windows first, never one still open, none twice."""
    clock, published = Clock(), []
    b, _ = book(clock, published=published)
    for port in range(1, 6):  # five windows, opened 0.1 s apart
        b.packets("sb1", [packet(dport=port)])
        clock.now += 0.1
    b.packets("sb1", [packet(dport=1)])  # a packet of the oldest window counts there, it opens none
    clock.now += 0.75  # the first three windows are over (opened at 0.0, 0.1, 0.2), the last two not
    assert b.flush(limit=2) == 2 and [e.dport for e in published] == [1, 2]
    assert b.flush(limit=2) == 1 and [e.dport for e in published] == [1, 2, 3]
    assert b.flush() == 0
    assert published[0].count == 2
    b.packets("sb1", [packet(dport=1)])  # a new window for port 1, the newest of all
    clock.now += 0.5
    assert b.flush() == 2 and [e.dport for e in published] == [1, 2, 3, 4, 5]
    clock.now += 0.6
    assert b.flush() == 1 and published[-1].dport == 1 and published[-1].count == 1


def test_the_event_names_what_the_issue_names_and_leaves_out_what_does_not_apply():
    clock = Clock()
    b, _ = book(clock)
    b.packets(
        "sb1",
        [packet(), packet("2001:db8::1", "internet", 58, None, 6), packet("192.0.2.1", "guard.deny", 17, 53)],
    )
    b.flush(everything=True)
    docs = [e.doc() for e in b.events("sb1")]
    tcp, icmp6, udp = docs
    assert set(tcp) == {
        "seq",
        "ts",
        "sandbox",
        "kind",
        "family",
        "proto",
        "dst",
        "dport",
        "step",
        "entry",
        "host",
        "count",
    }
    assert (tcp["proto"], tcp["dport"], tcp["step"], tcp["kind"]) == ("tcp", 443, "deny_out", "packet")
    assert (
        icmp6["proto"] == "icmpv6" and "dport" not in icmp6 and "entry" not in icmp6 and icmp6["family"] == 6
    )
    assert udp["proto"] == "udp" and udp["dport"] == 53 and udp["step"] == "guard.deny"
    json.dumps(docs)  # every field is JSON
    # an ICMP "port" never shows: only TCP and UDP have one
    b.packets("sb1", [packet("192.0.2.9", "internet", 1, 8)])
    b.flush(everything=True)
    assert "dport" not in b.events("sb1")[-1].doc()


def test_a_prefix_egressd_never_writes_is_no_event_and_is_counted():
    clock = Clock()
    b, _ = book(clock)
    b.packets("sb1", [packet(prefix="tenant-says-hi"), packet(prefix="deny_out ")], malformed=2)
    b.flush(everything=True)
    assert b.events() == [] and b.dropped == {"foreign": 2, "malformed": 2}


def test_open_windows_and_kept_events_are_bounded(monkeypatch):
    monkeypatch.setattr(dn, "MAX_OPEN", 5)
    clock = Clock()
    b, _ = book(clock, keep=3)
    b.packets("sb1", [packet(f"198.51.100.{i}") for i in range(8)])
    assert b.info()["open"] == 5 and b.dropped["agent"] == 3  # a flood of distinct destinations
    b.packets("sb1", [packet("198.51.100.0")])  # one already open still counts
    b.flush(everything=True)
    kept = b.events("sb1")
    assert [e.dst for e in kept] == ["198.51.100.2", "198.51.100.3", "198.51.100.4"]  # the last `keep`
    assert b.info()["events"] == 5 and b.info()["packets"] == 6


def test_queries_by_sandbox_age_and_sequence_and_the_status_excerpt():
    clock = Clock()
    b, _ = book(clock)
    b.packets("sb1", [packet("198.51.100.1")])
    b.packets("sb2", [packet("198.51.100.2")])
    b.flush(everything=True)
    clock.now += 100
    b.packets("sb1", [packet("198.51.100.3")])
    b.flush(everything=True)
    assert [e.dst for e in b.events()] == ["198.51.100.1", "198.51.100.2", "198.51.100.3"]
    assert [e.dst for e in b.events("sb1")] == ["198.51.100.1", "198.51.100.3"]
    assert [e.dst for e in b.events(since=50)] == ["198.51.100.3"]
    assert [e.dst for e in b.events(after=2)] == ["198.51.100.3"]
    assert b.events("nobody") == []
    assert [d["dst"] for d in b.recent("sb1", 1)] == ["198.51.100.3"]


def test_a_follower_waits_for_the_next_event_and_gets_nothing_when_none_comes():
    async def scenario():
        clock = Clock()
        b, _ = book(clock)
        waiter = asyncio.create_task(b.wait_after(None, 0, 5.0))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        b.packets("sb1", [packet()])
        b.flush(everything=True)
        got = await asyncio.wait_for(waiter, 1.0)
        assert [e.seq for e in got] == [1]
        t0 = asyncio.get_running_loop().time()
        assert await b.wait_after(None, 1, 0.05) == []
        assert asyncio.get_running_loop().time() - t0 >= 0.05

    asyncio.run(scenario())


def test_the_events_of_a_sandbox_the_agent_no_longer_knows_are_let_go(monkeypatch):
    monkeypatch.setattr(dn, "PRUNE_EVERY", 0.0)
    known = {"sb1", "sb2"}

    async def scenario():
        b, _ = book(Clock(), known=lambda sid: sid in known)
        b.packets("sb1", [packet()])
        b.packets("sb2", [packet()])
        b.flush(everything=True)
        known.discard("sb2")
        task = asyncio.create_task(b.run(interval=0.01))
        await asyncio.sleep(0.05)
        task.cancel()
        assert [e.sandbox for e in b.events()] == ["sb1"]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("event", "text"),
    [
        (
            {"ts": 0, "sandbox": "sb1", "kind": "packet", "family": 4, "proto": "tcp", "dst": "198.51.100.7",
             "dport": 443, "step": "deny_out", "entry": "198.51.100.0/24", "count": 3},
            "sb1  tcp 198.51.100.7:443  denied by deny_out 198.51.100.0/24  x3",
        ),
        (
            {"ts": 0, "sandbox": "sb1", "kind": "packet", "family": 6, "proto": "udp", "dst": "2001:db8::1",
             "dport": 53, "step": "deny_out", "entry": "bad.example", "host": "bad.example", "count": 1},
            "sb1  udp [2001:db8::1]:53  denied by deny_out bad.example",
        ),
        (
            {"ts": 0, "sandbox": "sb1", "kind": "packet", "family": 4, "proto": "icmp", "dst": "169.254.169.254",
             "step": "guard.deny", "entry": "169.254.0.0/16", "host": "api.example.com", "count": 1},
            "sb1  icmp 169.254.169.254  denied by guard.deny 169.254.0.0/16 (host api.example.com)",
        ),
    ],
)  # fmt: skip
def test_one_line_per_event_on_a_terminal(event, text):
    assert line(event).split("  ", 1)[1] == text


def test_a_dns_refusal_is_an_event_with_the_query_name_and_the_entry():
    clock = Clock()
    b, calls = book(clock)
    b.dns("sb1", "evil.example.net", "deny_out", "*.example.net")
    b.dns("sb1", "evil.example.net", "deny_out", "*.example.net")
    b.dns("sb1", "other.example.org", "internet", None)
    b.flush(everything=True)
    evil, other = (e.doc() for e in b.events("sb1"))
    assert evil == {
        "seq": 1, "ts": clock.now, "sandbox": "sb1", "kind": "dns", "step": "deny_out",
        "entry": "*.example.net", "name": "evil.example.net", "count": 2,
    }  # fmt: skip
    assert other["step"] == "internet" and "entry" not in other and other["count"] == 1
    assert calls == []  # no address to attribute
    assert (
        line(evil).split("  ", 1)[1]
        == "sb1  dns query evil.example.net  denied by deny_out *.example.net  x2"
    )
    assert b.packets_by[("deny_out", "dns")] == 2


def test_events_are_published_as_json_and_what_cannot_be_sent_is_counted():
    clock, sent, up = Clock(), [], [True]
    b, _ = book(clock)

    def send(subject, payload):
        if up[0]:
            sent.append((subject, json.loads(payload)))
        return up[0]

    b.publish_to(send, "egressd.denials.hosta")
    b.packets("sb1", [packet()])
    b.flush(everything=True)
    assert sent == [("egressd.denials.hosta", b.events("sb1")[0].doc())]
    up[0] = False  # no session: dropped, counted, never queued
    b.packets("sb1", [packet("198.51.100.8")])
    b.flush(everything=True)
    assert len(sent) == 1 and b.dropped["nats"] == 1 and len(b.events("sb1")) == 2


def test_the_events_subject_is_checked():
    from egressd.model.config import ConfigError, config_from_dict

    assert config_from_dict({"events": {"subject": "platform.denials"}}).denials.subject == "platform.denials"
    for bad in ("a..b", "a.*", "a.>", "", "with space"):
        with pytest.raises(ConfigError, match=r"events\.subject"):
            config_from_dict({"events": {"subject": bad}})


def test_a_flood_of_closed_windows_is_published_in_slices_with_the_loop_free_between(monkeypatch):
    monkeypatch.setattr(dn, "FLUSH_SLICE", 10)
    clock = Clock()

    async def scenario():
        b, _ = book(clock)
        b.packets("sb1", [packet(f"198.51.100.{i}") for i in range(35)])
        clock.now += 2
        seen = []

        async def other():  # another task of the loop (a `status` answer, say)
            for _ in range(10):
                seen.append(b.info()["events"])
                await asyncio.sleep(0)

        task = asyncio.create_task(b.run(interval=0))
        await other()
        task.cancel()
        assert b.info()["events"] == 35
        assert any(0 < n < 35 for n in seen)  # it ran while the windows were being published

    asyncio.run(scenario())


def test_windows_close_on_the_monotonic_clock_whatever_the_wall_clock_does():
    wall, mono = Clock(), Clock()
    b = DenialBook(10, lambda sid, step, dst: (None, None), wall=wall, clock=mono)
    b.packets("sb1", [packet()])
    wall.now -= 3600  # the wall clock stepped back an hour
    mono.now += 1.1
    assert b.flush() == 1 and b.events("sb1")[0].ts == 1_000_000.0  # ts: the wall time it was seen


def test_a_reload_keeps_what_the_sockets_listen_for_and_names_what_needs_a_restart():
    from egressd.agent.denials import pin_denials
    from egressd.model.config import config_from_dict

    running = config_from_dict({})
    loaded = config_from_dict(
        {"denials": {"group": 9, "rate": 7, "log": False}, "events": {"subject": "x.y"}}
    )
    config, changed = pin_denials(running, loaded)
    assert sorted(changed) == ["denials.group", "denials.log", "denials.subject"]
    d = config.denials
    assert (d.group, d.log, d.subject, d.rate) == (2, True, "egressd.denials", 7)  # rate applies now


def test_attribution_takes_at_most_its_share_of_each_second():
    from egressd.agent.denials import Budget

    now = [100.0]
    b = Budget(0.05, clock=lambda: now[0])
    assert b.allows()
    b.spend(0.06)  # one slow attribution (a policy of 4,000 host names)
    assert not b.allows() and not b.allows() and b.skipped == 2
    now[0] += 1.0  # the next second
    assert b.allows()


def test_the_dns_cache_answers_membership_without_building_the_set():
    from egressd.desired.dnscache import Answer, DnsCache

    cache = DnsCache(5, 300, 600, clock=lambda: 0.0)
    cache.record("a.example", "A", Answer("ok", ("198.51.100.7",), ttl=60))
    cache.record("a.example", "AAAA", Answer("ok", ("2001:db8::7",), ttl=60))
    holding = cache.holding("a.example")
    for addr in ("198.51.100.7", "2001:db8::7", "198.51.100.8", "2001:db8::8"):
        assert (addr in holding) == (addr in cache.addresses("a.example"))
    assert "198.51.100.7" not in cache.holding("b.example")


def test_what_the_kernel_limit_skipped_is_the_counter_beyond_the_packets_logged():
    b, _ = book(Clock())
    b.counted({"sb1": 100})  # the first read: a baseline, nothing known before it
    b.packets("sb1", [packet(f"198.51.100.{i}") for i in range(30)])
    b.counted({"sb1": 160})  # 60 denied since, 30 of them logged
    assert b.dropped["kernel"] == 30
    b.counted({"sb1": 5})  # the table was rebuilt: its counter starts again, nothing is inferred
    b.packets("sb1", [packet("198.51.100.99")])
    b.counted({"sb1": 6})  # all of it logged
    assert b.dropped["kernel"] == 30
