"""Metrics: the collector reads live reconciler state at scrape time; per-sandbox counters come from a
cache refreshed in the background; the HTTP endpoint. No root: the fake backend stands in for nftables."""

import asyncio
import random
import socket
import urllib.request

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from egressd.agent.metrics import DeniedCounters, Metrics, MetricsError, Snapshot, on_loop, snapshot
from egressd.kernel.fake import FakeBackend
from egressd.model.config import config_from_dict
from egressd.model.sandbox import PolicyError, parse_sandbox
from egressd.reconcile.reconciler import Reconciler
from tests.loopback import free_port

CONFIG = config_from_dict({"reconcile": {"retry_initial": 0.01, "retry_max": 0.05, "workers": 2}})


def sandbox(sid, **np):
    return parse_sandbox({"id": sid, "netns": f"/run/netns/{sid}", "network_policy": np})


def samples(registry) -> dict[tuple[str, tuple], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_collector_reads_live_state_and_cached_counters():
    fb = FakeBackend(namespaces={"/run/netns/a", "/run/netns/b", "/run/netns/bad"})

    async def main():
        r = Reconciler(fb, CONFIG, rng=random.Random(1))
        denied = DeniedCounters(r, fb, batch=1)  # batch 1: several trips to the executor
        feed = {"lines": 7, "rejected": 2}
        m = Metrics(lambda: snapshot(r, feed["lines"], feed["rejected"], denied))
        r.observe = m.observe
        r.start()
        try:
            r.upsert(sandbox("a", allow_internet_access=False))
            r.upsert(sandbox("b"))
            r.upsert(sandbox("late"))  # its namespace does not exist: pending, retried
            r.reject(
                PolicyError(["bad"], "bad", "/run/netns/bad", None)
            )  # a new invalid record: deny-all, error
            assert await r.wait_enforced("a", None, 5) and await r.wait_enforced("b", None, 5)
            await asyncio.sleep(0.1)  # a few retries of "late"
            fb.counters["/run/netns/a"] = (3, 180)
            await denied.refresh()
            got = samples(m.registry)
            assert got[("egressd_sandboxes", (("state", "enforced"),))] == 2
            assert got[("egressd_sandboxes", (("state", "pending"),))] == 1
            assert got[("egressd_sandboxes", (("state", "error"),))] == 1
            assert got[("egressd_reconciles_total", (("outcome", "applied"),))] == 3
            assert got[("egressd_apply_errors_total", ())] >= 1
            assert got[("egressd_apply_retries_total", ())] >= 1
            assert got[("egressd_feed_lines_total", ())] == 7
            assert got[("egressd_feed_lines_rejected_total", ())] == 2
            assert got[("egressd_dns_queries_total", ())] == 0
            assert got[("egressd_reconcile_duration_seconds_count", ())] >= 4
            assert got[("egressd_apply_duration_seconds_count", ())] >= 3
            assert got[("egressd_denied_packets_total", (("sandbox", "a"),))] == 3
            assert got[("egressd_denied_bytes_total", (("sandbox", "a"),))] == 180
            assert got[("egressd_denied_packets_total", (("sandbox", "b"),))] == 0
            assert not any(k[1] == (("sandbox", "late"),) for k in got)  # no table: no series
            # Live: the next scrape sees the next state, and a deleted sandbox's series go.
            r.delete("b")
            feed["lines"] += 1
            assert await r.wait_idle(5)
            await denied.refresh()
            got = samples(m.registry)
            assert got[("egressd_feed_lines_total", ())] == 8
            assert got[("egressd_sandboxes", (("state", "enforced"),))] == 1
            assert ("egressd_denied_packets_total", (("sandbox", "b"),)) not in got
            assert denied.refreshes == 2
        finally:
            await r.stop()

    asyncio.run(main())


def test_counter_read_failures_leave_the_sandbox_out():
    fb = FakeBackend(namespaces={"/run/netns/a"})

    async def main():
        r = Reconciler(fb, CONFIG, rng=random.Random(1))
        r.start()
        try:
            r.upsert(sandbox("a"))
            assert await r.wait_enforced("a", None, 5)
            fb.namespaces.clear()  # the namespace went away between reconcile and counter read
            denied = DeniedCounters(r, fb)
            await denied.refresh()
            assert denied.values == {}
        finally:
            await r.stop()

    asyncio.run(main())


def test_counters_interval_zero_turns_the_per_sandbox_series_off():
    async def main():
        r = Reconciler(FakeBackend(), CONFIG)
        denied = DeniedCounters(r, FakeBackend())
        denied.values = {"a": (1, 1)}
        task = asyncio.create_task(denied.run(lambda: 0))
        await asyncio.sleep(0.01)
        task.cancel()
        assert denied.values == {} and denied.refreshes == 0
        await r.stop()

    asyncio.run(main())


def test_http_endpoint_and_scrapes_run_on_the_loop():
    async def main():
        loop = asyncio.get_running_loop()
        threads = []

        def read():
            import threading

            threads.append(threading.current_thread())
            return Snapshot(feed_lines=5)

        m = Metrics(on_loop(loop, read))
        port = free_port()
        assert m.serve(f"127.0.0.1:{port}") == ("127.0.0.1", port)
        try:
            url = f"http://127.0.0.1:{port}/metrics"
            body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
            assert "egressd_feed_lines_total 5.0" in body
            assert 'egressd_sandboxes{state="enforced"} 0.0' in body
            import threading

            assert threads == [threading.main_thread()]  # the loop's thread, not the HTTP server's
            with pytest.raises(MetricsError, match="cannot serve metrics there"):
                Metrics(read).serve(f"127.0.0.1:{port}")  # in use
        finally:
            m.close()

    asyncio.run(main())


def test_empty_listen_serves_nothing():
    assert Metrics(Snapshot).serve("") is None


def test_ipv6_listen():
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
            port = s.getsockname()[1]
    except OSError:
        pytest.skip("no IPv6 loopback")
    m = Metrics(lambda: Snapshot(feed_lines=1))
    assert m.serve(f"[::1]:{port}") == ("::1", port)
    try:
        body = urllib.request.urlopen(f"http://[::1]:{port}/metrics", timeout=5).read().decode()
        assert "egressd_feed_lines_total 1.0" in body
    finally:
        m.close()


def _feed_samples(feed):
    async def main():
        r = Reconciler(FakeBackend(), CONFIG)
        try:
            return samples(Metrics(lambda: snapshot(r, 3, 1, None, feed=feed)).registry)
        finally:
            await r.stop()

    return asyncio.run(main())


def test_feed_health_of_a_connected_nats_source():
    got = _feed_samples({"connected": 1, "disconnects": 4, "revision": 1234, "keys": 9})
    assert got[("egressd_feed_connected", ())] == 1
    assert got[("egressd_feed_disconnects_total", ())] == 4
    assert got[("egressd_feed_revision", ())] == 1234
    assert got[("egressd_feed_lines_total", ())] == 3 and got[("egressd_feed_lines_rejected_total", ())] == 1


def test_feed_health_of_a_disconnected_source():
    got = _feed_samples({"connected": 0, "disconnects": 2, "revision": 0})
    assert got[("egressd_feed_connected", ())] == 0
    assert got[("egressd_feed_disconnects_total", ())] == 2
    assert got[("egressd_feed_revision", ())] == 0


def test_feed_revision_only_for_a_source_that_has_one():
    for feed in (None, {"lines": 5}, {"connected": True}):
        got = _feed_samples(feed)
        assert not any(name == "egressd_feed_revision" for name, _ in got)
        assert got[("egressd_feed_disconnects_total", ())] == 0
    assert _feed_samples({"connected": True})[("egressd_feed_connected", ())] == 1
    assert _feed_samples(None)[("egressd_feed_connected", ())] == 0


def test_feed_health_from_a_real_nats_source_and_its_text_exposition():
    from egressd.feed.nats import NatsSource
    from egressd.model.config import NatsFeed

    src = NatsSource("nats://127.0.0.1:4222", NatsFeed(host_id="h1"))
    src._apply_snapshot([], [].append, 0.0)
    src.revision, src.disconnects = 77, 1

    async def main():
        r = Reconciler(FakeBackend(), CONFIG)
        try:
            return generate_latest(Metrics(lambda: snapshot(r, 0, 0, None, feed=src.health())).registry)
        finally:
            await r.stop()

    text = asyncio.run(main()).decode()
    assert "# TYPE egressd_feed_connected gauge" in text and "egressd_feed_connected 1.0" in text
    assert "egressd_feed_disconnects_total 1.0" in text
    assert "# TYPE egressd_feed_revision gauge" in text and "egressd_feed_revision 77.0" in text


def test_denials_are_counted_host_wide_by_step_and_kind_and_what_was_lost_by_reason():
    from egressd.agent.denials import DenialBook
    from egressd.kernel.nflog import LoggedPacket

    def logged(prefix, dst="198.51.100.7"):
        return LoggedPacket(4, prefix, 6, "10.0.0.2", dst, 443, None, None, 2, 60)

    async def main():
        r = Reconciler(FakeBackend(), CONFIG, rng=random.Random(1))
        book = DenialBook(10, lambda sid, step, dst: (None, None))
        book.packets(
            "a", [logged("deny_out"), logged("deny_out"), logged("internet"), logged("x")], malformed=1
        )
        book.packets("b", [logged("deny_out", "198.51.100.8")])
        book.flush(everything=True)
        got = samples(Metrics(lambda: snapshot(r, 0, 0, None, denials=book)).registry)
        assert got[("egressd_denials_total", (("kind", "packet"), ("step", "deny_out")))] == 3
        assert got[("egressd_denials_total", (("kind", "packet"), ("step", "internet")))] == 1
        dropped = {k[1][0][1]: v for k, v in got.items() if k[0] == "egressd_denial_events_dropped_total"}
        assert dropped == {
            "kernel": 0,
            "agent": 0,
            "foreign": 1,
            "malformed": 1,
            "unknown": 0,
            "nats": 0,
            "publish": 0,
        }
        assert not any("sandbox" in dict(k[1]) for k in got if k[0].startswith("egressd_denial"))

    asyncio.run(main())
