"""`egressd run`: wiring of feed, desired state, reconciler, state file, status socket, signals, sd_notify.

Data flows one way: feed lines -> events -> desired state -> reconcile -> render -> apply. Shutting down
never touches a table: enforcement outlives the agent, and a restart adopts what is there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

from egressd import __version__
from egressd.agent import memory, signals
from egressd.agent.control import ControlError, ControlServer
from egressd.agent.denials import for_agent, pin_denials
from egressd.agent.hostdenials import run_denials
from egressd.agent.intake import FeedIntake
from egressd.agent.metrics import DeniedCounters, Metrics, MetricsError, on_loop, snapshot
from egressd.agent.persister import Persister
from egressd.agent.requests import ControlApi
from egressd.agent.systemd import sd_notify
from egressd.common.logs import log, setup_logging
from egressd.desired.dnscache import DnsCache
from egressd.desired.resolve import DnsService, Resolver
from egressd.desired.statefile import StateError, StateFile
from egressd.feed.lines import FeedError, Source
from egressd.feed.sources import parse_source
from egressd.kernel.backend import Backend
from egressd.kernel.hostside import HostBackend
from egressd.kernel.monitor import ChangeMonitor
from egressd.kernel.monitor_socket import raise_fd_limit
from egressd.kernel.nft import LibnftBackend
from egressd.model.config import Config, ConfigError, load_config
from egressd.reconcile.reconciler import Reconciler
from egressd.reconcile.restart import export_state, restore_state

READY_TIMEOUT = 120.0
VERIFY_TIMEOUT = 600.0  # the verification pass after READY: every table read whole (10,000 in seconds)
NAMESPACE_CHECK_INTERVAL = 1.0


def make_monitor(
    config: Config, on_change: Callable[[str], None], packets: Callable[[str, list[Any], int], None]
) -> ChangeMonitor | None:
    """Tables changed inside a sandbox are repaired when nftables reports it, not at the next resync; the
    same sockets hear the packets the tables log (denials)."""
    if not config.watch_changes:
        return None
    soft, hard = raise_fd_limit()  # one descriptor per watched sandbox, above the ones libnftables needs
    group = config.denials.group if config.denials.log else None
    monitor = ChangeMonitor(on_change, packets=packets, log_group=group)
    detail = None
    if monitor.capacity == 0:
        detail = "RLIMIT_NOFILE too low: repair waits for the resync"
    elif not monitor.own_filter:
        detail = "not in the initial pid namespace: each of our own writes costs one extra table read"
    log(
        logging.INFO if detail is None else logging.WARNING,
        "monitor_started",
        capacity=monitor.capacity,
        fd_limit=soft,
        fd_hard_limit=hard,
        own_filter=monitor.own_filter,
        detail=detail,
    )
    return monitor


class Agent:
    def __init__(
        self, config: Config, config_path: str | None, overrides: dict[str, Any], backend: Backend
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = overrides
        self.backend = backend
        self.state = StateFile(config.state_dir)
        self.verified = False  # the verification pass after READY is done (status: agent.verified)
        self.persister = Persister(self.state, lambda: export_state(self.reconciler), self._persisted)
        self.collector = memory.Collector(time.monotonic)
        cache = DnsCache(config.dns_min_ttl, config.dns_max_ttl, config.dns_retention)
        resolver = Resolver(config.dns_nameservers, config.dns_timeout)
        self.dns = DnsService(cache, resolver, on_change=lambda names: self.reconciler.names_changed(names))
        host = HostBackend(backend, config) if isinstance(backend, LibnftBackend) else None
        self.metrics: Metrics | None = None
        self.monitor = make_monitor(
            config, lambda sid: self.reconciler.queue.add(sid, urgent=True), self._on_packets
        )
        self.reconciler = Reconciler(
            backend,
            config,
            persist=self.persister.mark,
            idle=self._idle,
            flush=self.persister.flush,
            dns=self.dns,
            host_backend=host,
            on_table=self.monitor.watch if self.monitor is not None else None,
            observe=self._observe,
            dns_proxy=True,
        )
        self.source: Source = parse_source(
            config.feed_source,
            max_line=config.max_line_bytes,
            nats=config.nats,
            max_entries=config.max_entries,
        )
        self.denials = for_agent(self.reconciler, cache, config, self.source)
        self.intake = FeedIntake(self.reconciler, lambda: self.config.max_entries)
        self.api = ControlApi(self.reconciler, self.dns, lambda: self.config, self.agent_info, self.denials)
        self.control = ControlServer(config.control_socket, self.api.handle)
        self.started = time.time()
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []
        self.state_problem: str | None = None
        self.exit_code = 0
        self.denied: DeniedCounters | None = None
        self.metrics_error: str | None = None

    def _start_metrics(self) -> None:
        """[metrics] listen: the endpoint, the reconciler's timing hook, the denied-counter cache."""
        if not self.config.metrics_listen:
            return
        counted = self.denials.counted if self.denials is not None else None  # the kernel's skipped logs
        self.denied = DeniedCounters(self.reconciler, self.backend, on_read=counted)  # type: ignore[arg-type]

        def read() -> Any:
            intake = self.intake
            health = self.source.health()
            return snapshot(self.reconciler, intake.lines, intake.rejected, self.denied, health, self.denials)

        self.metrics = Metrics(on_loop(asyncio.get_running_loop(), read))
        try:
            self.metrics.serve(self.config.metrics_listen)
        except MetricsError as e:  # metrics are not worth stopping enforcement for: said loudly, not fatal
            self.metrics_error = str(e)
            log(logging.ERROR, "metrics_failed", error=str(e), detail="enforcement goes on without metrics")

    def _on_packets(self, sid: str, packets: list[Any], malformed: int) -> None:
        if self.denials is not None:
            self.denials.packets(sid, packets, malformed)

    def _persisted(self, generation: int) -> None:
        self.reconciler.persisted(generation)

    def _idle(self) -> None:
        """The reconciler ran out of work: what is pending goes to disk, what lives is frozen (memory.py)."""
        self.persister.settle()
        self.collector.idle()

    def _observe(self, kind: str, seconds: float) -> None:
        """The reconciler's timings, into the metrics once they serve."""
        if self.metrics is not None:
            self.metrics.observe(kind, seconds)

    def agent_info(self) -> dict[str, Any]:
        return {
            "version": __version__,
            "pid": os.getpid(),
            "started": self.started,
            "config": self.config_path,
            "feed": self.source.health() | {"lines": self.intake.lines, "rejected": self.intake.rejected},
            "state": {"path": str(self.state.path), "error": self.persister.error or self.state_problem},
            "queue": len(self.reconciler.queue),
            "verified": self.verified,
            "dns": self.api.dns_info(),
            "counts": self.reconciler.state_counts(),
            "reconciles": dict(self.reconciler.counters),
            "monitor": self.monitor.info() if self.monitor is not None else None,
            "denials": self.denials.info() if self.denials is not None else None,
            "metrics": {"listen": self.config.metrics_listen or None, "error": self.metrics_error},
        }

    # --- lifecycle ------------------------------------------------------------------------------------

    def _restore(self) -> None:
        try:
            doc = self.state.load()
        except StateError as e:
            self.state_problem = str(e)
            log(logging.ERROR, "state_unreadable", error=str(e))
            return
        if doc is None:
            log(logging.INFO, "state_empty", path=str(self.state.path))
            self.reconciler.disk.read(frozenset())  # no record anywhere: a new sandbox waits for no write
            return
        for problem in restore_state(self.reconciler, doc):
            log(logging.ERROR, "state_entry_skipped", error=problem)
        log(logging.INFO, "state_loaded", sandboxes=len(self.reconciler.desired))

    def reload(self) -> None:
        try:
            config = load_config(self.config_path, self.overrides)
        except ConfigError as e:
            log(logging.ERROR, "reload_failed", error=str(e), detail="keeping the running configuration")
            return
        fixed = {
            "feed_source", "nats", "state_dir", "control_socket", "workers", "watch_changes",
            "cached_contexts", "metrics_listen",
        }  # fmt: skip
        changed = sorted(k for k in fixed if getattr(config, k) != getattr(self.config, k))
        config, pinned = pin_denials(self.config, config)
        changed += pinned
        if changed:
            log(logging.WARNING, "reload_needs_restart", keys=changed)
        self.config = config
        setup_logging(config.log_format, config.log_level)
        cache = self.dns.cache
        cache.min_ttl, cache.max_ttl, cache.retention = (
            config.dns_min_ttl,
            config.dns_max_ttl,
            config.dns_retention,
        )
        self.dns.resolver = Resolver(config.dns_nameservers, config.dns_timeout)
        self.reconciler.set_config(config)
        log(logging.INFO, "reloaded", config=self.config_path)

    def _feed_ended(self, task: asyncio.Task[None]) -> None:
        """A feed that cannot run (its socket path is unusable) stops the agent: systemd says why."""
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            log(logging.INFO, "feed_ended", source=self.source.name, detail="enforcement goes on")
            return
        log(logging.CRITICAL, "feed_failed", source=self.source.name, error=str(exc))
        self.exit_code = 1
        self._stop.set()

    async def _catch_up(self, feed: asyncio.Task[None]) -> None:
        """Read what a file feed already holds into desired state before any worker applies anything."""
        await asyncio.sleep(0)  # let the feed start: a bad socket path fails here, before READY
        deadline = time.monotonic() + READY_TIMEOUT
        while not getattr(self.source, "caught_up", True) and not feed.done():
            if time.monotonic() > deadline:
                log(logging.WARNING, "feed_catch_up_slow", source=self.source.name)
                return
            await asyncio.sleep(0.01)
        if feed.done() and not feed.cancelled() and feed.exception() is not None:
            raise FeedError(str(feed.exception()))

    async def _resync_loop(self) -> None:
        rng = random.Random()
        while True:
            interval = self.reconciler.config.resync_interval
            await asyncio.sleep(interval * rng.uniform(0.9, 1.1))
            # What the last interval freed (DNS answers, tables read and compared, status reports) goes back
            # to the kernel: glibc returns free memory only from the top of a heap by itself.
            await asyncio.to_thread(memory.trim)
            if self.monitor is not None:
                self.monitor.refresh()  # reopen what failed, follow namespaces replaced under their path
            self.reconciler.resync()

    async def _namespace_loop(self) -> None:
        """Every second: a sandbox whose namespace path now names another namespace (or none) is applied
        again at once, not at the next resync. One stat per sandbox."""
        while True:
            await asyncio.sleep(NAMESPACE_CHECK_INTERVAL)
            for sid in self.reconciler.check_namespaces():
                log(logging.WARNING, "namespace_replaced", sandbox=sid)

    async def _watchdog(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            counts = self.reconciler.state_counts()
            sd_notify(f"WATCHDOG=1\nSTATUS={self._status_line(counts)}")

    @staticmethod
    def _status_line(counts: dict[str, int]) -> str:
        return f"{counts['enforced']} enforced, {counts['pending']} pending, {counts['error']} error"

    async def run(self) -> int:
        stop = self._stop.set
        signals.install(
            asyncio.get_running_loop(),
            {signal.SIGTERM: stop, signal.SIGINT: stop, signal.SIGHUP: self.reload},
        )
        await self.control.start()
        try:
            await self._start()
            await self._stop.wait()
            sd_notify("STOPPING=1")
            log(logging.INFO, "stopping", detail="tables stay in force")
        finally:
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.persister.flush()
            await self.control.close()
            await self.reconciler.stop()
            if self.monitor is not None:
                self.monitor.close()
            if self.metrics is not None:
                self.metrics.close()
        log(logging.INFO, "stopped")
        return self.exit_code

    async def _start(self) -> None:
        """Persisted state and the feed's backlog first, then one reconcile of everything, then READY=1."""
        self._restore()
        self._start_metrics()
        self._tasks.append(asyncio.create_task(self.dns.run(), name="dns"))
        if self.denials is not None:
            denials = run_denials(self.denials, self.reconciler, self.dns.cache, self.config.denials.group)
            self._tasks.append(asyncio.create_task(denials, name="denials"))
        feed = asyncio.create_task(self.source.run(self.intake.on_line), name="feed")
        feed.add_done_callback(self._feed_ended)
        self._tasks.append(feed)
        await self._catch_up(feed)
        self.reconciler.sync.adopt_by_fingerprint = True
        if self.monitor is not None:
            self.monitor.check_on_watch = False  # the verification pass (_verify) reads every table anyway
            self.monitor.paused = True  # and its sockets are made after READY, before that pass
        self.reconciler.start()
        log(
            logging.INFO,
            "started",
            version=__version__,
            pid=os.getpid(),
            feed=self.config.feed_source,
            sandboxes=len(self.reconciler.desired),
        )
        if not await self.reconciler.wait_idle(READY_TIMEOUT):
            log(logging.WARNING, "initial_reconcile_slow", detail=f"not done after {READY_TIMEOUT:g} s")
        self.reconciler.sync.adopt_by_fingerprint = False
        await self.reconciler.prune_host()
        self._tasks.append(asyncio.create_task(self._resync_loop(), name="resync"))
        self._tasks.append(asyncio.create_task(self._namespace_loop(), name="namespaces"))
        if self.denied is not None:
            counters = self.denied.run(lambda: self.config.metrics_counters_interval)
            self._tasks.append(asyncio.create_task(counters, name="denied-counters"))
        watchdog_usec = os.environ.get("WATCHDOG_USEC")
        if watchdog_usec and watchdog_usec.isdigit() and int(watchdog_usec) > 0:
            self._tasks.append(asyncio.create_task(self._watchdog(int(watchdog_usec) / 2e6), name="watchdog"))
        counts = self.reconciler.state_counts()
        sd_notify(f"READY=1\nSTATUS={self._status_line(counts)}")
        log(logging.INFO, "ready", **counts)
        self._tasks.append(asyncio.create_task(self._verify(), name="verify"))

    async def _verify(self) -> None:
        """Right after READY: watch every table, then compare every table whole (the verification pass). In
        that order a change made at any moment after the first pass is seen, by the pass or by the watch."""
        if self.monitor is not None:
            self.monitor.resume()
            if not await self.monitor.settled(READY_TIMEOUT):
                log(logging.WARNING, "monitor_slow", detail=f"sockets not all made after {READY_TIMEOUT:g} s")
            self.monitor.check_on_watch = True  # sandboxes watched from now on have no such pass
        self.reconciler.resync()
        if await self.reconciler.wait_idle(VERIFY_TIMEOUT):
            self.verified = True
            log(logging.INFO, "verified", detail="every table compared whole after the start")
        else:
            log(logging.WARNING, "verification_slow", detail=f"not done after {VERIFY_TIMEOUT:g} s")
        # The start's churn (the backlog parsed, a libnftables context made and freed per sandbox) is free
        # memory now: hand it back, off the loop (it walks every heap: tens of milliseconds).
        self.collector.settled()
        await asyncio.to_thread(memory.trim)


def run(config_path: str | None, overrides: dict[str, Any]) -> int:
    """Entry point of `egressd run`; returns the exit code."""
    config = load_config(config_path, overrides)
    setup_logging(config.log_format, config.log_level)
    memory.tune()
    memory.starting()
    # Every socket kept per sandbox (change monitors, DNS proxies) lives at a descriptor of 1024 or more,
    # above the ones libnftables needs: the soft limit goes up to the hard one (LimitNOFILE= in the unit).
    raise_fd_limit()
    backend = LibnftBackend(context_limit=config.cached_contexts)

    async def main() -> int:
        agent = Agent(config, config_path, overrides, backend)
        return await agent.run()

    try:
        return asyncio.run(main())
    except (ControlError, FeedError, StateError) as e:
        log(logging.CRITICAL, "startup_failed", error=str(e))
        return 1
    finally:
        with contextlib.suppress(Exception):
            backend.close()
