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
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from egressd.common.backoff import backoff_delay
from egressd.common.logs import log
from egressd.desired.dnscache import DnsCache
from egressd.desired.resolve import DnsService
from egressd.desired.store import Desired, DesiredStore
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.hostside import HostBackend
from egressd.kernel.netns import NetnsError, NsId, netns_id
from egressd.model.config import Config
from egressd.model.policy import (
    Event,
    PolicyError,
    Sandbox,
    Snapshot,
)
from egressd.reconcile.queue import KeyedQueue
from egressd.reconcile.status import Status, StatusBoard
from egressd.reconcile.sync import SyncResult, TableSync

PENDING_RETRY_MAX = 1.0  # a namespace that does not exist yet is looked for at least every second
COUNTERS = ("applied", "unchanged", "adopted", "repaired", "dns_updated", "failed")
COUNTERS += ("host_applied", "host_repaired", "host_failed")


@dataclass(frozen=True)
class Held:
    """What the kernel holds for one sandbox, as far as this agent knows: replaced whole, on the loop thread,
    after the kernel accepted a write (compute on a copy, commit the bookkeeping only on success)."""

    netns: str | None = None  # the namespace path holding its table
    written: tuple[str, str] | None = None  # (netns, fingerprint) this agent last wrote or adopted there
    ident: NsId | None = None  # the namespace its path named when it was last synced
    host_iface: str | None = None  # the interface whose host-side table it has
    host_written: tuple[str, str] | None = None  # (interface, fingerprint) last written there
    attempts: int = 0  # failed passes in a row: the retry backoff's exponent


NOTHING_HELD = Held()


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
        on_table: Callable[[str, str | None], None] | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        self.backend = backend
        # The host-side tables (hostside.py), for sandboxes that name host_interface; where a namespace
        # path would be, it takes the interface name.
        self.host_backend = host_backend
        self.config = config
        self.store = DesiredStore(self._desired_changed)
        self.board = StatusBoard()  # the read model behind status, wait and the metrics
        self.sync = TableSync(config)  # render cache, digests, adoption memory: the one table sync
        self.queue = KeyedQueue()
        self._persist = persist
        self._flush = flush
        self._idle = idle  # told when the queue has just run empty
        self.persisted_generation = 0  # desired state up to this generation is on disk (set by the persister)
        # Told where each sandbox's table now lives (path) or that it has none any more (None): the daemon
        # points its change monitor at it (see monitor.py).
        self.on_table = on_table
        self.dns = dns
        self._rng = rng or random.Random()
        self.held: dict[str, Held] = {}  # sandbox id -> what the kernel holds for it, as far as we know
        self._executor = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="egressd-apply")
        self._workers: list[asyncio.Task[None]] = []
        self.counters: Counter[str] = Counter(dict.fromkeys(COUNTERS, 0))
        self.retries = 0  # retries scheduled after a failed attempt
        # Told how long each piece of work took: ("reconcile", s) for one sandbox's whole pass, ("apply", s)
        # for one table sync in a worker thread (the daemon feeds its metrics with it; see metrics.py).
        self.observe = observe

    def persisted(self, generation: int) -> None:
        """The persister wrote desired state up to this generation."""
        self.persisted_generation = max(self.persisted_generation, generation)

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
        if self.dns is None:
            return
        for name in names:
            for sid in self.dns.cache.subscribers.get(name, ()):
                self.queue.add(sid)
        if self._persist is not None:
            self._persist()

    def set_config(self, config: Config) -> None:
        """A reloaded config: everything is re-rendered; unchanged tables cost nothing."""
        self.config = config
        if isinstance(self.host_backend, HostBackend):
            self.host_backend.set_config(config)
        self.sync.set_config(config)
        self.resync()

    def check_namespaces(self) -> list[str]:
        """The sandboxes whose namespace path now names another namespace, or none: each is synced again
        at once (and its change monitor moved), instead of at the next resync. A stat per sandbox: cheap
        enough to run every second."""
        changed = []
        for sid, h in list(self.held.items()):
            path = h.netns
            if path is None:
                continue
            now = _ident(path)
            if h.ident is not None and now != h.ident:
                changed.append(sid)
                # that table went with its namespace: a new one there is a first apply, no repair
                self._hold(sid, ident=None, written=None)
                if now is None:
                    self._let_go(sid)
                d = self.desired.get(sid)
                if d is not None:  # not enforced until the new namespace has its table: `wait` must know
                    reason = f"namespace at {path} was replaced or deleted; applying again"
                    self._record(
                        sid, Status("pending", d.revision, reason, netns=path, generation=d.generation)
                    )
                self.queue.add(sid, urgent=True)
        return changed

    def _let_go(self, sid: str) -> None:
        """Its namespace is gone: hold nothing of it (the change monitor's socket, the libnftables context
        would keep it alive). When a namespace appears at the path again, it is a first apply there."""
        path = self._held(sid).netns
        self._hold(sid, netns=None, written=None)
        if path is not None and self.on_table is not None:
            self.on_table(sid, None)  # (the backend drops its context when it finds the path gone)

    def resync(self) -> None:
        """Check every sandbox against the kernel again (drift, late namespaces, earlier failures)."""
        if isinstance(self.host_backend, HostBackend) and self._workers:
            self.host_backend.invalidate()
            if any(d.host_interface for d in self.desired.values()):
                asyncio.get_running_loop().create_task(self._check_guard(self.host_backend))
        in_use = {st.fingerprint for st in self.status.values()}
        in_use |= {h.host_written[1] for h in self.held.values() if h.host_written is not None}
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
        self._executor.shutdown(wait=True, cancel_futures=True)

    async def _worker(self) -> None:
        while True:
            sid = await self.queue.get()
            t0 = time.monotonic()
            try:
                await self._reconcile(sid)
            except Exception as e:  # a bug must not stop the worker: it is logged, reported and retried
                logging.getLogger("egressd").exception("reconcile_bug")
                self._record(sid, Status("error", error=f"internal error: {e!r}"))
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
        return {sid: h.netns for sid, h in self.held.items() if h.netns is not None}

    async def run_blocking(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) in the reconciler's worker threads, as the table work runs (metrics reads counters)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _retry(self, sid: str, cap: float) -> None:
        attempt = self._held(sid).attempts
        self.retries += 1
        self._hold(sid, attempts=attempt + 1)
        delay = backoff_delay(attempt, self.config.retry_initial, cap, self._rng)
        asyncio.get_running_loop().call_later(delay, self.queue.add, sid)

    def _held(self, sid: str) -> Held:
        return self.held.get(sid) or NOTHING_HELD

    def _hold(self, sid: str, **changes: Any) -> None:
        """One assignment of the sandbox's record, on the loop thread; an empty record is dropped."""
        h = replace(self._held(sid), **changes)
        if h == NOTHING_HELD:
            self.held.pop(sid, None)
        else:
            self.held[sid] = h

    def _record(self, sid: str, status: Status) -> None:
        self.board.record(sid, status)

    async def _reconcile(self, sid: str) -> None:
        d = self.desired.get(sid)
        if d is None:
            await self._forget(sid)
            return
        old_path = self._held(sid).netns
        if old_path is not None and old_path != d.netns:
            await self._release(sid, old_path)
        if self._flush is not None and d.generation > self.persisted_generation:
            await self._flush()  # desired state on disk before the kernel changes: a restart never goes back
        # The host side first: it needs no namespace, so a sandbox is judged there even before its own
        # namespace exists.
        host_error, host_writes = await self._reconcile_host(sid, d)
        if host_error is not None:
            self._attempts_failed(sid, d, host_error, pending=False)
            return
        if d.netns is None:
            self._record(
                sid,
                Status(
                    "pending", d.revision, d.problem or "no netns in the record yet", generation=d.generation
                ),
            )
            return
        ident = _ident(d.netns)
        loop = asyncio.get_running_loop()
        t0 = time.monotonic()
        waiting: str | None = None
        try:
            result = await self._adopt_on_hint(sid, d)
            if result is None:
                ruleset, elements, waiting = self.sync.target(d.policy, self._dns_cache())
                h = self._held(sid)
                last = h.written
                same_ns = ident is None or h.ident in (None, ident)
                last_fp = last[1] if last is not None and last[0] == d.netns and same_ns else None
                result = await loop.run_in_executor(
                    self._executor, self.sync.sync, self.backend, d.netns, ruleset, elements, last_fp
                )
        except NetnsError as e:
            self._observe("apply", time.monotonic() - t0)
            if e.gone:
                self._let_go(sid)
            self._attempts_failed(sid, d, e.reason, pending=e.gone)
            return
        except ApplyError as e:
            self._observe("apply", time.monotonic() - t0)
            self._attempts_failed(sid, d, str(e), pending=False)
            return
        self._observe("apply", time.monotonic() - t0)
        h = self._held(sid)
        if self.on_table is not None and (h.netns != d.netns or h.ident is None):
            self.on_table(sid, d.netns)  # a new path, or a new namespace at the same path
        # What the kernel holds now, even if a newer revision overtook this one (then no status is recorded
        # below): the next pass must not take our own write for someone else's. One assignment, after the
        # kernel accepted the write.
        self.held[sid] = replace(
            h, netns=d.netns, written=(d.netns, result.fingerprint), ident=ident or h.ident, attempts=0
        )
        new_digest = self.sync.learned(result)  # on the loop thread: workers only read the maps
        self.counters[result.outcome] += 1
        if (new_digest or result.outcome not in ("unchanged", "adopted")) and self._persist is not None:
            self._persist()  # a new digest or table: what a restart compares the tables with to adopt them
        if self.desired.get(sid) is not d:
            return  # superseded while we worked; the queue already holds the newer state
        state, error = (
            ("error", d.problem) if d.problem else ("pending", waiting) if waiting else ("enforced", None)
        )
        self._record(
            sid,
            Status(state, d.revision, error, netns=d.netns, fingerprint=result.fingerprint,
                   writes=result.writes + host_writes, generation=d.generation),
        )  # fmt: skip
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

    async def _adopt_on_hint(self, sid: str, d: Desired) -> SyncResult | None:
        """Restart, first pass: a table that carries the fingerprint the last agent put in force for this very
        record (and config, and version: see TableSync.adoption_key) is adopted on one raw fingerprint read,
        without rendering the policy. Rendering was half of a restart's time. The verification pass right
        after READY renders every policy and compares every table whole, so a renderer that changed within
        one version still gets its tables rewritten. None: take the ordinary path."""
        hint = self.sync.hint_for(sid, d.generation)
        if (
            hint is None
            or d.netns is None
            or d.host_interface is not None
            or d.policy.allow_out.hostnames
            or d.policy.deny_out.hostnames
        ):
            return None
        fingerprint, shape = hint
        loop = asyncio.get_running_loop()
        found = await loop.run_in_executor(self._executor, self.backend.fingerprint, d.netns)
        if found != fingerprint:
            return None
        return SyncResult("adopted", found, shape, self.sync.digests[shape], 0)

    def _dns_cache(self) -> DnsCache | None:
        return self.dns.cache if self.dns is not None else None

    def _attempts_failed(self, sid: str, d: Desired, reason: str, pending: bool) -> None:
        self.counters["failed"] += 1
        state = "pending" if pending else "error"
        old = self.status.get(sid)
        if old is None or old.state != state or old.error != reason:
            log(
                logging.INFO if pending else logging.ERROR,
                state,
                sandbox=sid,
                revision=d.revision,
                netns=d.netns,
                error=reason,
            )
        self._record(sid, Status(state, d.revision, reason, netns=d.netns, generation=d.generation))
        self._retry(sid, min(PENDING_RETRY_MAX, self.config.retry_max) if pending else self.config.retry_max)

    async def _reconcile_host(self, sid: str, d: Desired) -> tuple[str | None, int]:
        """The host-side table of a sandbox that names host_interface: (why it failed, writes made)."""
        loop = asyncio.get_running_loop()
        iface = d.host_interface
        old = self._held(sid).host_iface
        if old is not None and old != iface:
            error = await self._release_host(sid, old)
            if error is not None:
                return error, 0
        if iface is None:
            return None, 0
        if self.host_backend is None:
            return "host_interface is set but this agent has no host-side backend", 0
        ruleset, elements, _ = self.sync.target(d.policy, self._dns_cache(), host=True)
        last = self._held(sid).host_written
        last_fp = last[1] if last is not None and last[0] == iface else None
        t0 = time.monotonic()
        try:
            result = await loop.run_in_executor(
                self._executor, self.sync.sync, self.host_backend, iface, ruleset, elements, last_fp
            )
        except ApplyError as e:
            self._observe("apply", time.monotonic() - t0)
            self.counters["host_failed"] += 1
            return str(e), 0
        self._observe("apply", time.monotonic() - t0)
        self._hold(sid, host_iface=iface, host_written=(iface, result.fingerprint))
        self.sync.learned(result)
        if result.outcome in ("applied", "repaired"):
            self.counters[f"host_{result.outcome}"] += 1
        if result.outcome != "unchanged":
            log(
                logging.WARNING if result.outcome == "repaired" else logging.INFO,
                f"host_{result.outcome}",
                sandbox=sid,
                revision=d.revision,
                host_interface=iface,
                duration_ms=round((time.monotonic() - t0) * 1000, 2),
                detail=result.detail,
            )
        return None, result.writes

    async def _check_guard(self, host: HostBackend) -> None:
        """The host-side guard table is shared by every sandbox and changes with none: each resync reads it,
        and puts it back if it is gone or not as the config wants it (`nft flush ruleset` on the host)."""
        try:  # a repair is logged by ensure_guard itself, whichever path finds it first
            await asyncio.get_running_loop().run_in_executor(self._executor, host.ensure_guard)
        except ApplyError as e:
            log(logging.ERROR, "host_guard_failed", error=str(e))

    async def _release_host(self, sid: str, iface: str) -> str | None:
        """The sandbox no longer names iface (deleted, or moved): take its host-side table out."""
        if self.host_backend is None:
            return None
        host = self.host_backend
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, host.remove, iface)
        except ApplyError as e:
            log(logging.ERROR, "host_remove_failed", sandbox=sid, host_interface=iface, error=str(e))
            return str(e)
        self._hold(sid, host_iface=None, host_written=None)
        log(logging.INFO, "host_removed", sandbox=sid, host_interface=iface)
        return None

    async def _release(self, sid: str, path: str) -> None:
        """The sandbox left path (deleted, or moved to another namespace): take our table out of it."""
        self._hold(sid, netns=None)
        if self.on_table is not None:
            self.on_table(sid, None)
        if self.store.owns_netns(path):
            return  # another sandbox now owns that namespace; its worker rewrites the table
        loop = asyncio.get_running_loop()

        def remove() -> bool:
            try:
                return self.backend.remove(path)
            except NetnsError:
                return False
            finally:
                self.backend.forget(path)

        try:
            removed = await loop.run_in_executor(self._executor, remove)
        except ApplyError as e:
            log(logging.ERROR, "remove_failed", sandbox=sid, netns=path, error=str(e))
            return
        log(
            logging.INFO, "removed", sandbox=sid, netns=path, detail=None if removed else "no table was there"
        )

    async def _forget(self, sid: str) -> None:
        self._hold(sid, written=None, ident=None)
        path = self._held(sid).netns
        if path is not None:
            await self._release(sid, path)
        iface = self._held(sid).host_iface
        if iface is not None and await self._release_host(sid, iface) is not None:
            self._retry(sid, self.config.retry_max)  # a table for a deleted sandbox must not stay
        self._hold(sid, attempts=0)
        self.board.forget(sid)

    async def prune_host(self) -> list[str]:
        """Delete host-side tables of interfaces no sandbox names (sandboxes deleted while no agent ran).
        At start, after the first pass: only then is every sandbox that still names one known."""
        if self.host_backend is None:
            return []
        keep = [d.host_interface for d in self.desired.values() if d.host_interface is not None]
        loop = asyncio.get_running_loop()
        try:
            gone: list[str] = await loop.run_in_executor(self._executor, self.host_backend.prune, keep)
        except ApplyError as e:
            log(logging.ERROR, "host_prune_failed", error=str(e))
            return []
        if gone:
            log(logging.INFO, "host_pruned", tables=len(gone))
        return gone

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

    def report(self) -> list[dict[str, Any]]:
        cache = self._dns_cache()
        view = cache.view if cache is not None else None
        return self.board.rows(self.desired, view)

    def state_counts(self) -> dict[str, int]:
        return self.board.counts(self.desired)


def _ident(path: str | None) -> NsId | None:
    if path is None:
        return None
    try:
        return netns_id(path)
    except NetnsError:
        return None
