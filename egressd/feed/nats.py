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
import json
import logging
import re
import ssl
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import nats
import nats.errors
import nats.js.errors

from egressd.common.backoff import Backoff
from egressd.common.logs import log
from egressd.feed.lines import DEFAULT_MAX_LINE, FeedError, FeedStats, Line, OnLine, deliver
from egressd.feed.nats_errors import SessionEnded, describe, expected
from egressd.model.config import NatsFeed
from egressd.model.policy import (
    DEFAULT_MAX_ENTRIES,
    Delete,
    PolicyError,
    Sandbox,
    Snapshot,
    Upsert,
    parse_sandbox,
)

KV_DEL, KV_PURGE = "DEL", "PURGE"
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


@dataclass(frozen=True)
class KvEntry:
    """One key as the watch delivers it, without the client library's types (unit tests build these)."""

    key: str
    value: bytes | None
    revision: int
    op: str | None = None  # None for a put, KV_DEL or KV_PURGE

    @property
    def deleted(self) -> bool:
        return self.op in (KV_DEL, KV_PURGE)


Change = Upsert | Delete | PolicyError


def _redacted(spec: str) -> str:
    """The spec without what sits before an @: an error must not repeat a password it refuses."""
    return re.sub(r"//[^/@,]*@", "//***@", spec)


def parse_servers(spec: str) -> list[str]:
    """`nats://HOST:PORT` (or tls://), several separated by commas; FeedError says what to write."""
    urls = [u.strip() for u in spec.split(",")]
    shown = _redacted(spec)
    for url in urls:
        hint = (
            f"write nats://HOST:PORT or tls://HOST:PORT (several separated by commas), not {_redacted(url)!r}"
        )
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as e:
            raise FeedError(f"event source {shown!r}: {e}; {hint}") from None
        if parts.scheme not in ("nats", "tls") or not parts.hostname:
            raise FeedError(f"event source {shown!r}: {hint}")
        if parts.username is not None or parts.password is not None:
            raise FeedError(
                f"event source {shown!r}: credentials in the URL would show in status and logs; "
                "put them in a file and name it in [feed.nats] creds or nkey"
            )
        if port is None:
            raise FeedError(f"event source {shown!r}: no port; write nats://{parts.hostname}:4222")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise FeedError(
                f"event source {shown!r}: no path, query or fragment; the bucket is [feed.nats] bucket"
            )
    return urls


def tls_context(settings: NatsFeed, servers: list[str]) -> ssl.SSLContext | None:
    """TLS when a server is tls:// or any tls_* key is set; FeedError names the key whose file is unusable."""
    if not (settings.tls_ca or settings.tls_cert or any(s.startswith("tls://") for s in servers)):
        return None
    try:
        ctx = ssl.create_default_context(cafile=settings.tls_ca or None)
    except (OSError, ssl.SSLError) as e:
        raise FeedError(f"[feed.nats] tls_ca {settings.tls_ca!r}: {e}; give a PEM CA bundle") from None
    # Python 3.13's defaults on every release: a certificate that Debian 13 refuses is refused on 12 too,
    # so moving a host to 13 never cuts it off its feed.
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN
    if settings.tls_cert:
        try:
            ctx.load_cert_chain(settings.tls_cert, settings.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise FeedError(
                f"[feed.nats] tls_cert {settings.tls_cert!r} / tls_key {settings.tls_key!r}: {e}; "
                "give a PEM certificate and its key"
            ) from None
    return ctx


def _check_readable(key: str, path: str) -> None:
    if not path:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise FeedError(f"[feed.nats] {key} {path!r}: cannot read it: {e.strerror or e}") from None


def entry_change(
    entry: KvEntry,
    host_id: str,
    max_value: int = DEFAULT_MAX_LINE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Change:
    """What one key of this host means: an upsert, a delete, or a PolicyError naming what is wrong.

    The key names the sandbox: the record's `id` may be left out, and must match when given. The KV
    revision is the record's revision, whatever the value says.
    """
    sid = entry.key[len(host_id) + 1 :]
    if entry.deleted:
        return Delete(sid)
    try:
        parse_sandbox({"id": sid})  # only to learn whether the key's id is a valid sandbox id
    except PolicyError as e:
        return PolicyError([f"key {entry.key!r}: {p}" for p in e.problems])

    def refused(problem: str) -> PolicyError:
        return PolicyError([f"sandbox {sid!r}: {problem}"], sid, None, entry.revision)

    value = entry.value or b""
    if not value.strip():
        return refused("the value is empty; to remove a sandbox, delete its key")
    if len(value) > max_value:
        return refused(f"the value is {len(value)} bytes, more than [feed] max_line_bytes ({max_value})")
    try:
        raw: Any = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e) or "too deep"
        return refused(f"the value is not a JSON record: {why}")
    if not isinstance(raw, dict):
        return refused(f"the value must be a JSON object (a sandbox record), not {type(raw).__name__}")
    try:
        change: Change = Upsert(parse_sandbox({**raw, "id": sid, "revision": entry.revision}, max_entries))
    except PolicyError as e:
        change = e
    if "id" in raw and raw["id"] != sid:
        # Refused, but closed where the record says the sandbox lives, like any other bad record.
        netns, iface = (
            (change.sandbox.netns, change.sandbox.host_interface)
            if isinstance(change, Upsert)
            else (change.netns, change.host_interface)
        )
        problem = (
            f"sandbox {sid!r}: the record's id {str(raw['id'])[:80]!r} is not the key's; write it under key"
            f" {host_id}.<its id>, or leave id out"
        )
        return PolicyError([problem], sid, netns, entry.revision, iface)
    return change


def snapshot_of(
    entries: Iterable[KvEntry],
    host_id: str,
    max_value: int = DEFAULT_MAX_LINE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> tuple[Snapshot, list[tuple[KvEntry, PolicyError]]]:
    """The bucket's current values for this host as one authoritative snapshot, plus the keys that cannot
    name a sandbox at all (reported on their own: they must not stop the snapshot from forgetting others)."""
    latest: dict[str, KvEntry] = {}
    for e in entries:
        latest[e.key] = e  # in revision order: the last one is the current value
    sandboxes: list[Sandbox] = []
    rejected: list[PolicyError] = []
    unnamed: list[tuple[KvEntry, PolicyError]] = []
    for e in latest.values():
        change = entry_change(e, host_id, max_value, max_entries)
        if isinstance(change, Upsert):
            sandboxes.append(change.sandbox)
        elif isinstance(change, PolicyError):
            if change.sandbox_id is None:
                unnamed.append((e, change))
            else:
                problems = [f"key {e.key} (revision {e.revision}): {p}" for p in change.problems]
                rejected.append(
                    PolicyError(
                        problems, change.sandbox_id, change.netns, change.revision, change.host_interface
                    )
                )
    return Snapshot(tuple(sandboxes), tuple(rejected), authoritative=True), unnamed


class NatsSource:
    """nats://HOST:PORT with [feed.nats]: a snapshot of this host's keys per session, then every change."""

    def __init__(
        self,
        spec: str,
        settings: NatsFeed,
        max_value: int = DEFAULT_MAX_LINE,
        max_entries: int = DEFAULT_MAX_ENTRIES,
    ) -> None:
        self.servers = parse_servers(spec)
        self.settings = settings
        self.name = spec
        self.max_value = max_value
        self.max_entries = max_entries
        self._tls = tls_context(settings, self.servers)
        _check_readable("creds", settings.creds)
        _check_readable("nkey", settings.nkey)
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

    async def run(self, on_line: OnLine) -> None:
        """Sessions until cancelled; a failed or lost one is retried with backoff, never raised."""
        self._stats.since = time.time()
        while True:
            try:
                await self._session(on_line)
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
