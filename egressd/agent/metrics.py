"""Prometheus metrics: `[metrics] listen` (default 127.0.0.1:9469), served by prometheus_client.

Nothing is counted twice: a custom collector reads the agent's own state (statuses, reconcile counters,
DNS and feed counts) at scrape time, on the event loop, so a scrape sees one consistent moment. Only two
things live here: the reconcile/apply duration histograms, fed by the reconciler's `observe` hook, and the
cache of per-sandbox `denied` counters.

Reading a sandbox's `denied` counter is one libnftables call in its namespace under the process-wide
lock, so it is never done by a scrape: a background task reads every table every `counters_interval`
seconds, in batches of COUNTER_BATCH on the reconciler's worker threads (table work interleaves between
batches), and the collector serves the last values read.

Cardinality: every series has a small fixed label set, except the two per-sandbox counters, which carry
`sandbox` (the id): 2 x N series for N sandboxes with a table (2,000 at 1,000 sandboxes).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from egressd.agent.denials import DenialBook
from egressd.common.logs import log
from egressd.kernel.backend import ApplyError
from egressd.kernel.netns import NetnsError
from egressd.model.config_file import parse_listen
from egressd.reconcile.reconciler import COUNTERS, Reconciler

COUNTER_BATCH = 50  # counters read per trip to a worker thread
SCRAPE_TIMEOUT = 5.0
STATES = ("enforced", "pending", "error")
# Apply: one table sync (a read, and a write when needed): 1 ms .. 1 s is the range that matters.
APPLY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
DNS_ANSWER_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
RECONCILE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class MetricsError(Exception):
    """The metrics endpoint cannot be served (the address is in use, or not ours)."""


class CounterBackend(Protocol):
    def counter(self, netns: str, name: str = "denied") -> tuple[int, int] | None: ...


@dataclass
class Snapshot:
    """What a scrape reports, read at one moment on the event loop."""

    states: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATES, 0))
    reconciles: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    retries: int = 0
    dns_queries: int = 0
    dns_failures: int = 0
    dns_names: int = 0
    feed_lines: int = 0
    feed_rejected: int = 0
    feed_connected: int = 0  # the source's health: 1 when connected (NATS: session up, snapshot applied)
    feed_disconnects: int = 0
    feed_revision: int | None = None  # the last KV revision seen, for a nats:// source
    denied: dict[str, tuple[int, int]] = field(default_factory=dict)  # sandbox -> (packets, bytes)
    proxy_queries: dict[str, int] = field(default_factory=dict)  # DNS proxy answers, by outcome
    proxy_sandboxes: int = 0  # sandboxes whose DNS the proxy answers
    proxy_learned: int = 0  # addresses in force from their answers
    denial_packets: dict[tuple[str, str], int] = field(default_factory=dict)  # (step, kind) -> packets
    denial_dropped: dict[str, int] = field(default_factory=dict)  # why -> packets not made events


def snapshot(
    reconciler: Reconciler,
    feed_lines: int,
    feed_rejected: int,
    denied: DeniedCounters | None,
    feed: dict[str, object] | None = None,
    denials: DenialBook | None = None,
) -> Snapshot:
    """The agent's live state, as the collector reports it. Call on the event loop."""
    states = dict.fromkeys(STATES, 0)
    for sid in set(reconciler.desired) | set(reconciler.status):
        st = reconciler.status.get(sid)
        state = st.state if st is not None else "pending"  # as `egressd status` reports it
        states[state] = states.get(state, 0) + 1
    dns = reconciler.dns
    known = reconciler.desired
    return Snapshot(
        states=states,
        reconciles=dict(reconciler.counters),
        retries=reconciler.retries,
        dns_queries=dns.queries if dns is not None else 0,
        dns_failures=dns.failures if dns is not None else 0,
        dns_names=len(dns.cache.names) if dns is not None else 0,
        feed_lines=feed_lines,
        feed_rejected=feed_rejected,
        feed_connected=1 if feed and feed.get("connected") else 0,
        feed_disconnects=_int(feed.get("disconnects", 0)) if feed else 0,
        feed_revision=_int(feed["revision"]) if feed and "revision" in feed else None,
        denied={s: v for s, v in denied.values.items() if s in known} if denied is not None else {},
        proxy_queries=dict(reconciler.proxy.counts),
        proxy_sandboxes=len(reconciler.proxy.sandboxes),
        proxy_learned=reconciler.proxy.learned_total(),
        denial_packets=dict(denials.packets_by) if denials is not None else {},
        denial_dropped=dict(denials.dropped) if denials is not None else {},
    )


def _int(value: object) -> int:
    return value if isinstance(value, int) else 0


class AgentCollector(Collector):
    """Builds every state-derived metric from read() at scrape time."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        s = self._read()
        g = GaugeMetricFamily(
            "egressd_sandboxes", "Sandboxes known to the agent, by enforcement state", labels=["state"]
        )
        for state, n in sorted(s.states.items()):
            g.add_metric([state], n)
        yield g
        c = CounterMetricFamily(
            "egressd_reconciles",
            "Reconcile outcomes per sandbox pass (host_* are host-side tables)",
            labels=["outcome"],
        )
        for outcome, n in sorted(s.reconciles.items()):
            c.add_metric([outcome], n)
        yield c
        yield CounterMetricFamily(
            "egressd_apply_errors",
            "Reconcile attempts that failed (nftables refused, namespace missing, host side failed)",
            value=s.reconciles.get("failed", 0),
        )
        yield CounterMetricFamily(
            "egressd_apply_retries", "Retries scheduled after a failed attempt", value=s.retries
        )
        yield CounterMetricFamily("egressd_dns_queries", "DNS queries sent by the agent", value=s.dns_queries)
        yield CounterMetricFamily(
            "egressd_dns_failures", "DNS queries that got no usable answer", value=s.dns_failures
        )
        yield GaugeMetricFamily(
            "egressd_dns_cache_names", "Host names held in the DNS cache", value=s.dns_names
        )
        yield CounterMetricFamily("egressd_feed_lines", "Feed lines read", value=s.feed_lines)
        yield CounterMetricFamily(
            "egressd_feed_lines_rejected", "Feed lines (or records in them) rejected", value=s.feed_rejected
        )
        yield GaugeMetricFamily(
            "egressd_feed_connected",
            "1 while the feed source is connected (nats://: a session is up and its snapshot applied)",
            value=s.feed_connected,
        )
        yield CounterMetricFamily(
            "egressd_feed_disconnects",
            "Sessions with the feed's server that were lost",
            value=s.feed_disconnects,
        )
        if s.feed_revision is not None:
            yield GaugeMetricFamily(
                "egressd_feed_revision",
                "The last key-value revision the feed has seen",
                value=s.feed_revision,
            )
        yield from _denied_metrics(s)
        yield from _denial_event_metrics(s)
        yield from _proxy_metrics(s)


def _denial_event_metrics(s: Snapshot) -> tuple[Metric, Metric]:
    """The packets the tables logged as denied, host-wide (docs/denials.md), and what was lost."""
    total = CounterMetricFamily(
        "egressd_denials",
        "Denied packets (and DNS queries) reported as events, by the step that denied them",
        labels=["step", "kind"],
    )
    for (step, kind), n in sorted(s.denial_packets.items()):
        total.add_metric([step, kind], n)
    dropped = CounterMetricFamily(
        "egressd_denial_events_dropped",
        "Denials not made events: kernel (over the table's log rate limit, from its denied counter), "
        "agent (its bounds), foreign (a log prefix egressd never writes), "
        "malformed (unreadable log messages), unknown (a host-side drop on no sandbox's interface), "
        "nats (events not published: no session up)",
        labels=["reason"],
    )
    for reason in ("kernel", "agent", "foreign", "malformed", "unknown", "nats", "publish"):
        dropped.add_metric([reason], s.denial_dropped.get(reason, 0))
    return total, dropped


def _denied_metrics(s: Snapshot) -> tuple[Metric, Metric]:
    """The two per-sandbox counters (packets, bytes), the only series labelled by sandbox."""
    packets = CounterMetricFamily(
        "egressd_denied_packets",
        "Packets denied by a sandbox's table (its `denied` counter, read every counters_interval)",
        labels=["sandbox"],
    )
    nbytes = CounterMetricFamily(
        "egressd_denied_bytes",
        "Bytes denied by a sandbox's table (its `denied` counter, read every counters_interval)",
        labels=["sandbox"],
    )
    for sid, (p, b) in sorted(s.denied.items()):
        packets.add_metric([sid], p)
        nbytes.add_metric([sid], b)
    return packets, nbytes


class DeniedCounters:
    """The last `denied` counter values read from each sandbox's table, refreshed in the background."""

    def __init__(
        self,
        reconciler: Reconciler,
        backend: CounterBackend,
        batch: int = COUNTER_BATCH,
        on_read: Callable[[dict[str, int]], None] | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.backend = backend
        self.batch = batch
        self.on_read = on_read  # told every pass's packet counts (denials: what the kernel's limit skipped)
        self.values: dict[str, tuple[int, int]] = {}
        self.refreshes = 0
        self.last_duration = 0.0

    def _read(self, items: list[tuple[str, str]]) -> list[tuple[str, tuple[int, int] | None]]:
        """In a worker thread: one libnftables call per namespace."""
        out: list[tuple[str, tuple[int, int] | None]] = []
        for sid, netns in items:
            try:
                out.append((sid, self.backend.counter(netns)))
            except (NetnsError, ApplyError):
                out.append((sid, None))  # gone or being replaced: the reconciler deals with it
        return out

    async def refresh(self) -> None:
        """Read every table's counter once, in batches, so table work is never queued behind all of it."""
        t0 = time.monotonic()
        tables = list(self.reconciler.tables().items())
        fresh: dict[str, tuple[int, int]] = {}
        for i in range(0, len(tables), self.batch):
            for sid, value in await self.reconciler.run_blocking(self._read, tables[i : i + self.batch]):
                if value is not None:
                    fresh[sid] = value
        self.values = fresh  # sandboxes deleted since the last pass drop out of the series
        if self.on_read is not None:
            self.on_read({sid: packets for sid, (packets, _) in fresh.items()})
        self.refreshes += 1
        self.last_duration = time.monotonic() - t0

    async def run(self, interval: Callable[[], float]) -> None:
        while True:
            every = interval()
            if every <= 0:
                self.values = {}
                await asyncio.sleep(5.0)  # off; the interval may be turned on by a reload
                continue
            try:
                await self.refresh()
            except RuntimeError:  # the executor is shut down: the agent is stopping
                return
            await asyncio.sleep(every)


def _proxy_metrics(s: Snapshot) -> Iterable[Metric]:
    c = CounterMetricFamily(
        "egressd_dns_proxy_queries", "Sandbox DNS queries the proxy handled, by outcome", labels=["outcome"]
    )
    for outcome, n in sorted(s.proxy_queries.items()):
        c.add_metric([outcome], n)
    yield c
    yield GaugeMetricFamily(
        "egressd_dns_proxy_sandboxes", "Sandboxes whose DNS the proxy answers", value=s.proxy_sandboxes
    )
    yield GaugeMetricFamily(
        "egressd_dns_proxy_learned_addresses",
        "Addresses in force from sandboxes' own DNS answers",
        value=s.proxy_learned,
    )


class Metrics:
    """The registry, the histograms, the denied-counter cache and the HTTP server of one agent."""

    def __init__(self, read: Callable[[], Snapshot]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.reconcile_seconds = Histogram(
            "egressd_reconcile_duration_seconds",
            "One sandbox's whole reconcile pass (host side, table, status)",
            buckets=RECONCILE_BUCKETS,
            registry=self.registry,
        )
        self.apply_seconds = Histogram(
            "egressd_apply_duration_seconds",
            "One table sync in a worker thread: read, and write when the kernel differs",
            buckets=APPLY_BUCKETS,
            registry=self.registry,
        )
        self.dns_answer_seconds = Histogram(
            "egressd_dns_proxy_answer_seconds",
            "One sandbox DNS query, from its arrival to its reply (upstream and kernel write included)",
            buckets=DNS_ANSWER_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(AgentCollector(read))
        self._server: Any = None
        self._thread: Any = None

    def observe(self, kind: str, seconds: float) -> None:
        """The reconciler's hook."""
        if kind == "reconcile":
            self.reconcile_seconds.observe(seconds)
        elif kind == "apply":
            self.apply_seconds.observe(seconds)
        elif kind == "dns_answer":
            self.dns_answer_seconds.observe(seconds)

    def serve(self, listen: str) -> tuple[str, int] | None:
        """Start the HTTP server (its own thread) on listen; "" serves nothing."""
        where = parse_listen(listen)
        if where is None:
            return None
        host, port = where
        try:
            self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise MetricsError(f"[metrics] listen = {listen!r}: cannot serve metrics there: {e}") from None
        log(logging.INFO, "metrics_listening", address=listen, port=self._server.server_port)
        return host, self._server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def on_loop(loop: asyncio.AbstractEventLoop, read: Callable[[], Snapshot]) -> Callable[[], Snapshot]:
    """read(), called from the HTTP server's thread but run on the event loop, which owns the state."""

    async def call() -> Snapshot:
        return read()

    def threadsafe() -> Snapshot:
        return asyncio.run_coroutine_threadsafe(call(), loop).result(SCRAPE_TIMEOUT)

    return threadsafe
