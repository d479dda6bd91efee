"""Desired state against what the kernel holds, one sandbox at a time, until they agree.

Level-triggered: a worker never applies "the event", it reads the latest desired state of its sandbox and
the table in the kernel, and makes the second equal to the first. Events, retries and periodic resyncs all
just mark a sandbox dirty in a keyed, coalescing queue: one worker per sandbox at a time, the latest
desired state wins, failures come back with jittered, capped backoff.

All bookkeeping lives on the event loop thread; only the blocking netlink work runs in worker threads, with
immutable inputs.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from egressd.common.backoff import backoff_delay
from egressd.common.logs import log
from egressd.desired.dnscache import DnsCache
from egressd.desired.resolve import DnsService
from egressd.desired.store import Desired, DesiredStore
from egressd.intercept.service import Interceptor
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.hostside import HostBackend
from egressd.kernel.netns import NetnsError
from egressd.model.config import Config
from egressd.model.events import Event, Snapshot
from egressd.model.sandbox import PolicyError, Sandbox
from egressd.reconcile.held import HeldTable
from egressd.reconcile.hostpass import HostPass
from egressd.reconcile.netnspass import NetnsPass, OnTable, ident_of
from egressd.reconcile.ondisk import DiskRecords
from egressd.reconcile.queue import KeyedQueue
from egressd.reconcile.status import Status, StatusBoard
from egressd.reconcile.sync import SyncResult, TableSync
from egressd.ruleset.dnsrules import intercepting

PENDING_RETRY_MAX = 1.0  # a namespace that does not exist yet is looked for at least every second
COUNTERS = ("applied", "unchanged", "adopted", "repaired", "dns_updated", "failed")
COUNTERS += ("host_applied", "host_repaired", "host_failed")


class Reconciler:
    """Owns desired state and status; workers make the kernel match. Call everything from the loop."""

    def __init__(
        self,
        backend: Backend,
        config: Config,
        *,
        persist: Callable[[], Any] | None = None,
        flush: Callable[[], Awaitable[None]] | None = None,
        dns: DnsService | None = None,
        rng: random.Random | None = None,
        host_backend: Backend | None = None,
        idle: Callable[[], None] | None = None,
        on_table: OnTable | None = None,
        observe: Callable[[str, float], None] | None = None,
        dns_proxy: bool = False,
    ) -> None:
        self.backend = backend
        self.config = config
        self.store = DesiredStore(self._desired_changed)
        self.board = StatusBoard()  # the read model behind status, wait and the metrics
        self.sync = TableSync(config)  # render cache, digests, adoption memory: the one table sync
        self.queue = KeyedQueue()
        self._persist = persist
        self._flush = flush
        self._idle = idle  # told when the queue has just run empty
        self.disk = DiskRecords()  # what the state file may hold (told by the persister and the restore)
        self.dns = dns
        self._rng = rng or random.Random()
        self.held = HeldTable()  # what the kernel holds for each sandbox, as far as we know
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="egressd-apply")
        self._workers: list[asyncio.Task[None]] = []
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.retries = 0  # retries scheduled after a failed attempt
        # Told how long each piece of work took: ("reconcile", s) for one sandbox's whole pass, ("apply", s)
        # for one table sync in a worker thread (the daemon feeds its metrics with it; see metrics.py).
        self.observe = observe
        # on_table: told where each sandbox's table now lives, or None (the daemon's change monitor follows).
        run, held = self.run_blocking, self.held
        self.netns = NetnsPass(backend, self.sync, held, run, on_table, self.store.owns_netns)
        # host_backend: the host-side tables (hostside.py), keyed by the interface a sandbox names.
        self.host = HostPass(host_backend, self.sync, held, self.counters, run, self._observe)
        # DNS interception (intercept/): only an agent serves it (dns_proxy); without it nothing listens.
        self.proxy = Interceptor(config, backend, host_backend, run, serving=dns_proxy, observe=self._observe)

    def persisted(self, generation: int) -> None:
        """The persister wrote desired state up to this generation (the one it exported last)."""
        self.disk.written(generation)

    @property
    def desired(self) -> dict[str, Desired]:
        return self.store.desired

    @property
    def tombstones(self) -> OrderedDict[str, int | None]:
        return self.store.tombstones

    def _desired_changed(self, sid: str, d: Desired | None) -> None:
        """The store's one callback: the sandbox's names are watched, it is queued, the state gets written."""
        if self.dns is not None:
            names = (*d.policy.allow_out.hostnames, *d.policy.deny_out.hostnames) if d is not None else ()
            self.dns.subscribe(sid, names)
        self.queue.add(sid)
        if self._persist is not None:
            self._persist()

    def upsert(self, sb: Sandbox, latest: bool = False) -> bool:
        return self.store.upsert(sb, latest)

    def reject(self, err: PolicyError, latest: bool = False) -> None:
        self.store.reject(err, latest)

    def delete(self, sid: str) -> None:
        self.store.delete(sid)

    def snapshot(self, snap: Snapshot) -> None:
        self.store.snapshot(snap)

    def handle(self, event: Event) -> None:
        self.store.handle(event)

    def names_changed(self, names: set[str]) -> None:
        """DNS answers changed: only the sandboxes that name those hosts are looked at again."""
        subscribers = self.dns.cache.subscribers if self.dns is not None else {}
        for sid in sorted({sid for name in names for sid in subscribers.get(name, ())}):
            self.queue.add(sid)
        if self._persist is not None:
            self._persist()

    def set_config(self, config: Config) -> None:
        """A reloaded config: everything is re-rendered; unchanged tables cost nothing."""
        self.config = config
        if isinstance(self.host.backend, HostBackend):
            self.host.backend.set_config(config)
        self.proxy.set_config(config)
        self.sync.set_config(config)
        self.resync()

    def check_namespaces(self) -> list[str]:
        """The sandboxes whose namespace path now names another namespace, or none: each is synced again
        at once (and its change monitor moved), instead of at the next resync. A stat per sandbox: cheap
        enough to run every second."""
        changed = self.netns.moved()
        for sid, path in changed:
            d = self.desired.get(sid)
            if d is not None:  # not enforced until the new namespace has its table: `wait` must know
                reason = f"namespace at {path} was replaced or deleted; applying again"
                self.board.record(
                    sid, Status("pending", d.revision, reason, netns=path, generation=d.generation)
                )
            self.queue.add(sid, urgent=True)
        return [sid for sid, _ in changed]

    def resync(self) -> None:
        """Check every sandbox against the kernel again (drift, late namespaces, earlier failures)."""
        if self._workers:
            self.host.resync(any(d.host_interface for d in self.desired.values()))
        in_use: set[str | None] = {st.fingerprint for st in self.status.values()}
        in_use |= self.held.host_fingerprints()
        self.sync.prune(in_use)  # policies no sandbox has any more: keep the maps bounded
        for sid in list(self.desired):
            self.queue.add(sid)

    # --- workers --------------------------------------------------------------------------------------

    def start(self) -> None:
        for i in range(self.config.workers):
            self._workers.append(asyncio.create_task(self._worker(), name=f"reconcile-{i}"))

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        self.proxy.close()
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _worker(self) -> None:
        while True:
            sid = await self.queue.get()
            t0 = time.monotonic()
            try:
                await self._reconcile(sid)
            except Exception as e:  # a bug must not stop the worker: it is logged, reported and retried
                logging.getLogger("egressd").exception("reconcile_bug")
                self.board.record(sid, Status("error", error=f"internal error: {e!r}"))
                self._retry(sid, self.config.retry_max)
            finally:
                self.queue.done(sid)
                self._observe("reconcile", time.monotonic() - t0)
                if self._idle is not None and self.queue.idle():
                    self._idle()

    def _observe(self, kind: str, seconds: float) -> None:
        if self.observe is not None:
            self.observe(kind, seconds)

    def tables(self) -> dict[str, str]:
        """Sandbox id -> the namespace path that holds its table, for every table this agent wrote or
        adopted (a copy: safe to keep across awaits)."""
        return self.held.tables()

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the reconciler's worker threads, as the table work runs (metrics reads counters)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _retry(self, sid: str, cap: float) -> None:
        attempt = self.held.get(sid).attempts
        self.retries += 1
        self.held.hold(sid, attempts=attempt + 1)
        delay = backoff_delay(attempt, self.config.retry_initial, cap, self._rng)
        asyncio.get_running_loop().call_later(delay, self.queue.add, sid)

    async def _reconcile(self, sid: str) -> None:
        d = self.desired.get(sid)
        if d is None:
            await self._forget(sid)
            return
        old_path = self.held.get(sid).netns
        if old_path is not None and old_path != d.netns:
            await self.netns.release(sid, old_path)
            await self.proxy.release(sid)
        if self._flush is not None and self.disk.must_wait(sid, d.generation):
            await self._flush()  # desired state on disk before the kernel changes: a restart never goes back
        # The host side first: it needs no namespace, so a sandbox is judged there even before its own
        # namespace exists.
        host_error, host_writes = await self.host.reconcile(sid, d, self._dns_cache())
        if host_error is not None:
            self._attempts_failed(sid, d, host_error, pending=False)
            return
        if d.netns is None:
            self.board.record(
                sid,
                Status(
                    "pending", d.revision, d.problem or "no netns in the record yet", generation=d.generation
                ),
            )
            return
        if not await self._listen(sid, d):
            return
        ident = ident_of(d.netns)
        t0 = time.monotonic()
        try:
            result, waiting = await self.netns.sync(sid, d, d.netns, ident, self._dns_cache())
        except NetnsError as e:
            if e.gone:
                self.netns.let_go(sid)
            self._attempts_failed(sid, d, e.reason, pending=e.gone)
            return
        except ApplyError as e:
            self._attempts_failed(sid, d, str(e), pending=False)
            return
        finally:
            self._observe("apply", time.monotonic() - t0)
        new_digest = self.netns.commit(sid, d.netns, ident, result)
        self.counters[result.outcome] += 1
        if (new_digest or result.outcome not in ("unchanged", "adopted")) and self._persist is not None:
            self._persist()  # a new digest or table: what a restart compares the tables with to adopt them
        if self.desired.get(sid) is not d:
            return  # superseded while we worked; the queue already holds the newer state
        state, error = (
            ("error", d.problem) if d.problem else ("pending", waiting) if waiting else ("enforced", None)
        )
        self.board.record(
            sid,
            Status(state, d.revision, error, netns=d.netns, fingerprint=result.fingerprint,
                   writes=result.writes + host_writes, generation=d.generation),
        )  # fmt: skip
        _log_outcome(sid, d, result, t0)

    def _dns_cache(self) -> DnsCache | None:
        return self.dns.cache if self.dns is not None else None

    def _attempts_failed(self, sid: str, d: Desired, reason: str, pending: bool) -> None:
        self.counters["failed"] += 1
        state = "pending" if pending else "error"
        old = self.status.get(sid)
        if old is None or old.state != state or old.error != reason:
            level = logging.INFO if pending else logging.ERROR
            log(level, state, sandbox=sid, revision=d.revision, netns=d.netns, error=reason)
        self.board.record(sid, Status(state, d.revision, reason, netns=d.netns, generation=d.generation))
        self._retry(sid, min(PENDING_RETRY_MAX, self.config.retry_max) if pending else self.config.retry_max)

    async def _listen(self, sid: str, d: Desired) -> bool:
        """The sandbox's DNS proxy up before its table redirects queries to it (or closed when its DNS is
        not intercepted); False when it cannot listen: the sandbox is not enforced, and retried."""
        assert d.netns is not None
        wanted = intercepting(d.policy, self.config)
        failed = await self.proxy.listen(sid, d.netns, d.policy, d.host_interface, wanted)
        if failed is not None:
            self._attempts_failed(sid, d, *failed)
        return failed is None

    async def _forget(self, sid: str) -> None:
        await self.proxy.release(sid)
        self.held.hold(sid, written=None, ident=None)
        path = self.held.get(sid).netns
        if path is not None:
            await self.netns.release(sid, path)
        iface = self.held.get(sid).host_iface
        if iface is not None and await self.host.release(sid, iface) is not None:
            self._retry(sid, self.config.retry_max)  # a table for a deleted sandbox must not stay
        self.held.hold(sid, attempts=0)
        self.board.forget(sid)

    async def prune_host(self) -> list[str]:
        """Delete host-side tables of interfaces no sandbox names (sandboxes deleted while no agent ran).
        At start, after the first pass: only then is every sandbox that still names one known."""
        return await self.host.prune(d.host_interface for d in self.desired.values() if d.host_interface)

    # --- waiting and reporting ------------------------------------------------------------------------

    @property
    def status(self) -> dict[str, Status]:
        return self.board.status

    def is_enforced(self, sid: str, revision: int | None) -> bool:
        return self.board.is_enforced(sid, revision, self.desired.get(sid))

    async def wait_enforced(self, sid: str, revision: int | None, timeout: float) -> bool:
        return await self.board.wait_for(lambda: self.is_enforced(sid, revision), timeout)

    async def wait_idle(self, timeout: float) -> bool:
        """Until every sandbox has been reconciled once (startup: READY=1 after this)."""
        status = self.board.status
        return await self.board.wait_for(
            lambda: self.queue.idle() and all(sid in status for sid in self.desired), timeout
        )

    def report(self, sid: str | None = None) -> Iterator[dict[str, Any]]:
        """Every sandbox's status row, each made as it is taken; with sid, its row alone (if known)."""
        cache = self._dns_cache()
        view = cache.view if cache is not None else None
        if sid is None or not self.board.knows(sid, self.desired):
            return self.board.rows(self.desired, view) if sid is None else iter(())
        return iter([self.board.row(sid, self.desired.get(sid), view)])

    def state_counts(self) -> dict[str, int]:
        return self.board.counts(self.desired)


def _log_outcome(sid: str, d: Desired, result: SyncResult, t0: float) -> None:
    if result.outcome != "unchanged":
        log(
            logging.WARNING if result.outcome == "repaired" else logging.INFO,
            result.outcome,
            sandbox=sid,
            revision=d.revision,
            netns=d.netns,
            duration_ms=round((time.monotonic() - t0) * 1000, 2),
            detail=result.detail,
            error=d.problem,
        )
