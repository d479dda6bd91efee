"""nats://HOST:PORT: desired state from a NATS JetStream key-value bucket, for platforms with many hosts.

The control plane writes one key per sandbox, `<host_id>.<sandbox_id>`, whose value is the same sandbox record
the local feed carries. Each host watches only `<host_id>.>`. On every (re)connection the bucket's current
values for this host are one authoritative snapshot (so a key written twice while we were away is applied
once, at its latest value, and a key deleted meanwhile is forgotten); after it, every put is an upsert and
every delete or purge a delete, with the KV revision as the record's revision.

While the server cannot be reached, nothing here touches desired state: the agent enforces what it holds
(restored from its state file at a start) and this source retries with backoff. Reconnecting is ours, not
the client library's, so that every session starts with a snapshot.

Only hosts whose feed is nats:// import this module (see feed.sources.parse_source), so the client library is
imported here, once, and by no other host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import nats
import nats.errors
import nats.js.errors

from egressd.common.backoff import Backoff
from egressd.common.logs import log
from egressd.feed.lines import DEFAULT_MAX_LINE, FeedStats, Line, OnLine, deliver
from egressd.feed.nats_errors import SessionEnded, describe, expected
from egressd.feed.nats_keys import KvEntry, entry_change, snapshot_of
from egressd.feed.nats_servers import check_readable, parse_servers, tls_context
from egressd.model.config import NatsFeed
from egressd.model.sandbox import DEFAULT_MAX_ENTRIES, PolicyError

PING_INTERVAL = 10  # seconds; a server that stops answering is given up after two unanswered pings
CLOSE_TIMEOUT = 2.0
# A session must last this long for the backoff to start again from retry_initial: a server that accepts
# and then drops every session (lame duck, expiring credentials) is not hit by a fleet twice a second.
STABLE_SESSION = 60.0
BUCKET_CHECK_INTERVAL = 10.0  # seconds between checks that the bucket is still the one being watched
# JetStream requests (the bucket, its stream, the watch's consumer) may wait this long. A server makes
# consumers one at a time, each costing more the more keys the bucket holds (nats-server 2.9: about 1.3 ms
# per 1,000 keys): a host that gave up after 5 s and asked again only added to the queue.
REQUEST_TIMEOUT = 30.0
# The server deletes a watch's consumer this long after its session is gone (nats-py's default is 5
# minutes: every reconnection of every host would leave one more consumer behind for that long).
WATCH_INACTIVE = 15.0
# Between two of the bucket's current values while a snapshot is read: longer means the watch is stuck.
SNAPSHOT_IDLE = 30.0

logger = logging.getLogger(__name__)


class NatsSource:
    """nats://HOST:PORT with [feed.nats]: a snapshot of this host's keys per session, then every change."""

    def __init__(
        self,
        spec: str,
        settings: NatsFeed,
        max_value: int = DEFAULT_MAX_LINE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        session: Callable[[OnLine], Awaitable[None]] | None = None,
    ) -> None:
        """session: what one session does (tests give their own); by default, connect, snapshot, watch."""
        self.servers = parse_servers(spec)
        self.settings = settings
        self.name = spec
        self.max_value = max_value
        self.max_entries = max_entries
        self._tls = tls_context(settings, self.servers)
        check_readable("creds", settings.creds)
        check_readable("nkey", settings.nkey)
        self.prefix = f"{settings.host_id}."
        self._stats = FeedStats(spec)
        self._backoff = Backoff(settings.retry_initial, settings.retry_max)
        # True once the first snapshot is in desired state, or the first attempt failed: the daemon waits
        # for it before applying anything, and then enforces what it holds while we retry.
        self.caught_up = False
        self.live = False  # a session is up and its snapshot applied
        self.server: str | None = None
        self.keys: set[str] = set()
        self.revision = 0
        self.snapshots = 0
        self.disconnects = 0
        self.values_rejected = 0
        self.connected_since: float | None = None
        self.retry_at: float | None = None
        self._cause: Exception | None = None
        self._watching = False  # the current session's watch is made: client errors now end the session
        self._run_session = session or self._session
        self._nc: Any = None  # the session's connection, while there is one (publish)
        self._sending: set[asyncio.Task[Any]] = set()
        self._subjects: set[str] = set()  # what publish() sent on
        self._refused: set[str] = set()  # what the server refused: not sent again

    def publish(self, subject: str, payload: bytes) -> bool:
        """One message out on the session's connection (denial events, docs/denials.md); False when no
        session is up or the server refused this subject: the caller counts it as dropped. Never waits:
        the client buffers it."""
        nc = self._nc
        if nc is None or not nc.is_connected or subject in self._refused:
            return False
        self._subjects.add(subject)
        task = asyncio.get_running_loop().create_task(nc.publish(subject, payload))
        self._sending.add(task)
        task.add_done_callback(self._sent)
        return True

    def _refused_publish(self, e: Exception) -> bool:
        """Whether e is the server refusing a publish to one of our events' subjects (the host's
        credentials may only read the bucket): publishing stops, said once; the feed is not affected. Any
        other refusal (a JetStream request is a publish too) still ends the session."""
        text = str(e)
        marker = "permissions violation for publish to "
        at = text.lower().find(marker)
        subject = text[at + len(marker) :].strip().strip("'\"") if at >= 0 else ""
        if subject not in self._subjects:
            return False
        if subject not in self._refused:
            self._refused.add(subject)
            log(
                logging.WARNING,
                "events_publish_refused",
                subject=subject,
                detail="the NATS server refused this host's denial events: grant the host's credentials "
                "publish on this subject, or set [events] publish = false",
            )
        return True

    def _sent(self, task: asyncio.Task[Any]) -> None:
        self._sending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log(logging.DEBUG, "feed_publish_failed", error=repr(task.exception()))

    async def run(self, on_line: OnLine) -> None:
        """Sessions until cancelled; a failed or lost one is retried with backoff, never raised."""
        self._stats.since = time.time()
        while True:
            try:
                await self._run_session(on_line)
                cause = self._cause
                problem = describe(cause, self.settings.bucket) if cause else "the connection was closed"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # any failure of a session is one more retry, never the agent's end
                if isinstance(e, nats.errors.NoServersError) and self._cause is not None:
                    e = self._cause
                problem = describe(e, self.settings.bucket)
                if not expected(e):
                    logger.exception("feed_session_failed", extra={"fields": {"source": self.name}})
            if not self.live and self._tls is not None and not self.settings.tls_cert:
                # TLS 1.3: a server that wants a client certificate may refuse it after the handshake, which
                # the client sees as a lost connection, not as the server's alert.
                problem += "; if the server verifies its clients, set [feed.nats] tls_cert and tls_key"
            if self.live:
                self.disconnects += 1
                if time.time() - (self.connected_since or 0) >= STABLE_SESSION:
                    self._backoff.reset()  # a session that held: the next attempt comes soon
            self.live, self.server, self.connected_since = False, None, None
            self.caught_up = True  # from now on the agent enforces what it holds
            delay = self._backoff.next()
            self.retry_at = time.time() + delay
            self._stats.error(f"{problem}; enforcing the last known state, retrying in {delay:.1f} s")
            await asyncio.sleep(delay)
            self.retry_at = None

    def health(self) -> dict[str, object]:
        h = self._stats.as_dict()
        h.update(
            connected=int(self.live),
            server=self.server,
            bucket=self.settings.bucket,
            host_id=self.settings.host_id,
            keys=len(self.keys),
            revision=self.revision,
            snapshots=self.snapshots,
            disconnects=self.disconnects,
            values_rejected=self.values_rejected,
            connected_since=self.connected_since,
            retry_at=self.retry_at,
        )
        return h

    async def _connect(self, lost: asyncio.Event) -> Any:
        async def closed() -> None:
            lost.set()

        async def error(e: Exception) -> None:
            if self._refused_publish(e):
                return  # our own events only: the feed is whole, the session goes on
            self._cause = e  # what NoServersError hides; reported once per retry by run()
            if self._watching:
                # Once the watch is on, any error the client reports (a message dropped as a slow consumer,
                # a consumer it could not make again, a permission refused) may have cost us a change:
                # start over with a snapshot rather than follow with a gap.
                lost.set()

        return await nats.connect(
            servers=self.servers,
            name=f"egressd {self.settings.host_id}",
            allow_reconnect=False,  # ours: every new session starts with a snapshot
            max_reconnect_attempts=1,  # so that connect() gives up: each server is tried twice
            reconnect_time_wait=0.1,  # type: ignore[arg-type]
            connect_timeout=self.settings.connect_timeout,  # type: ignore[arg-type]
            ping_interval=PING_INTERVAL,
            max_outstanding_pings=2,
            tls=self._tls,
            user_credentials=self.settings.creds or None,
            nkeys_seed=self.settings.nkey or None,
            error_cb=error,
            disconnected_cb=closed,
            closed_cb=closed,
        )

    async def _session(self, on_line: OnLine) -> None:
        lost = asyncio.Event()
        self._cause, self._watching = None, False
        nc = await self._connect(lost)
        tasks: list[asyncio.Task[Any]] = []
        self._nc = nc
        try:
            js = nc.jetstream(timeout=max(self.settings.connect_timeout, REQUEST_TIMEOUT))
            kv = await js.key_value(self.settings.bucket)
            stream = f"KV_{self.settings.bucket}"
            created = (await js.stream_info(stream)).created
            watcher = await kv.watch(f"{self.prefix}>", inactive_threshold=WATCH_INACTIVE)
            self._watching = True
            self.server = str(nc.connected_url.geturl()) if nc.connected_url else None
            tasks = [
                asyncio.create_task(lost.wait(), name="feed-nats-lost"),
                asyncio.create_task(self._follow(watcher, on_line), name="feed-nats-watch"),
                asyncio.create_task(self._check_bucket(js, stream, created), name="feed-nats-check"),
            ]
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                t.result()  # the watch or the check ended: raise why
        finally:
            self._nc = None
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), CLOSE_TIMEOUT)

    async def _follow(self, watcher: Any, on_line: OnLine) -> None:
        """The snapshot (everything up to the watch's end-of-initial-values marker), then each change.

        Never a partial snapshot (it would forget the sandboxes it did not get to): a watch that stops, or
        goes quiet for SNAPSHOT_IDLE before the marker, ends the session instead."""
        started = time.monotonic()
        self.revision = 0  # of this session's bucket: one made anew counts from 1 again
        initial: list[KvEntry] = []
        while True:
            try:
                item = await watcher.updates(timeout=SNAPSHOT_IDLE)
            except TimeoutError:  # nats.errors.TimeoutError is one
                raise SessionEnded(
                    f"the bucket's current values stopped coming after {len(initial)} keys; reading again"
                ) from None
            if item is None:
                break
            if not hasattr(item, "key"):  # nats-py's end-of-iteration sentinel
                raise SessionEnded("the bucket's watch stopped before its current values were all read")
            initial.append(self._entry(item))
        self._apply_snapshot(initial, on_line, time.monotonic() - started)
        async for item in watcher:
            if item is not None:
                self._apply_change(self._entry(item), on_line)
        raise SessionEnded("the bucket's watch was stopped")

    async def _check_bucket(self, js: Any, stream: str, created: Any) -> None:
        """A bucket deleted, or deleted and made anew, stops a watch without a word (and the client would
        resume the new one past its first revisions): look every BUCKET_CHECK_INTERVAL, and start a new
        session, with a snapshot, when the bucket is not the one this session began with."""
        while True:
            await asyncio.sleep(BUCKET_CHECK_INTERVAL)
            try:
                info = await js.stream_info(stream)
            except nats.js.errors.NotFoundError:
                raise SessionEnded(f"bucket {self.settings.bucket!r} was deleted") from None
            except TimeoutError:
                continue  # a busy server: the pings decide whether the connection is lost
            if info.created != created or info.state.last_seq < self.revision:
                raise SessionEnded(f"bucket {self.settings.bucket!r} was made anew; reading it again")

    def _entry(self, item: Any) -> KvEntry:
        entry = KvEntry(item.key, item.value, int(item.revision or 0), item.operation)
        self.revision = max(self.revision, entry.revision)
        return entry

    def _apply_snapshot(self, entries: list[KvEntry], on_line: OnLine, took: float) -> None:
        snap, unnamed = snapshot_of(entries, self.settings.host_id, self.max_value, self.max_entries)
        self._stats.last_error = None  # connected: what is wrong from now on is a value, said below
        for e, err in unnamed:
            self._reject(e, err, on_line)
        self.values_rejected += len(snap.rejected)
        latest = {e.key: e for e in entries}
        self.keys = {k for k, e in latest.items() if not e.deleted}
        deliver(self._stats, on_line, [Line(self.name, self.revision, None, event=snap)])
        self.snapshots += 1
        self.live, self.caught_up = True, True
        self.connected_since = time.time()
        log(
            logging.INFO,
            "feed_connected",
            source=self.name,
            server=self.server,
            bucket=self.settings.bucket,
            host_id=self.settings.host_id,
            keys=len(self.keys),
            rejected=len(snap.rejected) + len(unnamed),
            revision=self.revision,
            snapshot_ms=round(took * 1000, 1),
        )

    def _apply_change(self, entry: KvEntry, on_line: OnLine) -> None:
        if entry.deleted:
            self.keys.discard(entry.key)
        else:
            self.keys.add(entry.key)
        change = entry_change(entry, self.settings.host_id, self.max_value, self.max_entries)
        if isinstance(change, PolicyError):
            self._reject(entry, change, on_line)
            return
        deliver(self._stats, on_line, [Line(self.name, entry.revision, None, key=entry.key, event=change)])

    def _reject(self, entry: KvEntry, err: PolicyError, on_line: OnLine) -> None:
        self.values_rejected += 1
        self._stats.last_error = f"key {entry.key} (revision {entry.revision}): {'; '.join(err.problems)}"
        deliver(self._stats, on_line, [Line(self.name, entry.revision, None, key=entry.key, event=err)])
