"""Every denial visible (docs/denials.md): the packets the sandboxes' tables logged, as events.

The kernel logs each denied packet to the NFLOG group of the sandbox's namespace, with the step that denied
it as the log prefix, at most `[denials] rate` a second per sandbox and step (render.py); the change
monitor's socket in that namespace hears them (kernel/nflog.py) and hands them here, on the event loop.
Each packet becomes an event naming the sandbox, the destination, the step, the list entry and the host
name behind the address (ruleset/decide.attribute, from the policy in force and the DNS cache). Identical
events within a second are one event with a count: the first packet opens a window, the event is
published when it closes (one `denied` log line, the metrics, the events kept for `egressd denials`).

Bounded everywhere, since a sandbox decides how much it is denied: at most MAX_OPEN windows at once (more
are dropped and counted), `keep` events per sandbox. Nothing here can change what is enforced.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from egressd.common.logs import log, log_batch
from egressd.desired.dnscache import DnsCache
from egressd.kernel.nflog import LoggedPacket
from egressd.model.config import Config
from egressd.reconcile.reconciler import Reconciler
from egressd.ruleset.decide import attribute
from egressd.ruleset.render import STEP_CHAINS

WINDOW = 1.0  # seconds: identical events within it are one, with a count
PRUNE_EVERY = 10.0  # seconds between drops of the events of sandboxes the agent no longer knows
MAX_OPEN = 10_000  # windows open at once, all sandboxes together
RECENT = 10_000  # the last events of all sandboxes together, for `egressd denials` without a sandbox
FLUSH_SLICE = 200  # events published before the event loop gets its turn
ATTRIBUTION_BUDGET = 0.05  # seconds of each second that finding entries and host names may take
PROTOCOLS = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
STEPS = frozenset(STEP_CHAINS)

# (sandbox, step, destination) -> (the list entry, the host name) behind the denial
Describe = Callable[[str, str, str], tuple[str | None, str | None]]
Key = tuple[str, str, int | None, str | None, str | None, int | None, str, str | None, str | None]


@dataclass
class Denial:
    """One event: what a sandbox tried, which step of the semantics denied it, how many times."""

    ts: float
    sandbox: str
    kind: str  # "packet" or "dns"
    family: int | None  # None for "dns": the proxy answers the query wherever it was sent
    proto: str | None
    dst: str | None
    dport: int | None
    step: str
    entry: str | None
    host: str | None
    name: str | None = None  # the query name of a "dns" event
    count: int = 1
    opened: float = 0.0  # monotonic: when its window opened (a wall clock stepped back never holds it open)
    where: str | None = None  # "host": dropped by the host-side table's guard (host_interface)
    seq: int = 0  # the order of publication, agent-wide; `egressd denials --follow` asks for what follows

    def doc(self) -> dict[str, Any]:
        """The event as JSON, without the fields that do not apply."""
        out = {
            "seq": self.seq,
            "ts": round(self.ts, 3),
            "sandbox": self.sandbox,
            "kind": self.kind,
            "family": self.family,
            "proto": self.proto,
            "dst": self.dst,
            "dport": self.dport,
            "step": self.step,
            "entry": self.entry,
            "host": self.host,
            "name": self.name,
            "where": self.where,
            "count": self.count,
        }
        return {k: v for k, v in out.items() if v is not None}


def _proto(number: int) -> str:
    return PROTOCOLS.get(number, str(number))


def _port(p: LoggedPacket) -> int | None:
    return p.dport if p.proto in (6, 17) else None


class DenialBook:
    """Aggregates, keeps and publishes denial events. Use from the event loop thread only."""

    def __init__(
        self,
        keep: int,
        describe: Describe,
        publish: Iterable[Callable[[Denial], None]] = (),
        wall: Callable[[], float] = time.time,
        known: Callable[[str], bool] = lambda sid: True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keep = keep
        self._describe = describe
        self._known = known
        self._publish = list(publish)
        self._wall = wall
        self._clock = clock
        self._open: dict[Key, Denial] = {}
        self._kept: dict[str, deque[Denial]] = {}
        self._logged: Counter[str] = (
            Counter()
        )  # packets each sandbox's table logged, since its counter was read
        self._counted: dict[str, int] = {}  # each table's `denied` counter, as last read
        self._recent: deque[Denial] = deque(maxlen=RECENT)  # every sandbox's, for the queries of all
        self._seq = 0
        self._changed = asyncio.Condition()
        self.packets_by: Counter[tuple[str, str]] = Counter()  # (step, kind) -> packets
        self.dropped: Counter[str] = Counter()  # why events were lost -> packets

    # --- in -------------------------------------------------------------------------------------------

    def packets(self, sid: str, packets: list[LoggedPacket], malformed: int = 0) -> None:
        """What one sandbox's namespace logged. A prefix that names no step was not written by egressd
        (a tenant's own rule logging to the group): dropped and counted, never an event."""
        if malformed:
            self.dropped["malformed"] += malformed
        for p in packets:
            if p.prefix not in STEPS:
                self.dropped["foreign"] += 1
                continue
            self._logged[sid] += 1
            self._add(sid, "packet", p.family, _proto(p.proto), p.dst, _port(p), p.prefix, None)

    def host_packet(self, sid: str, p: LoggedPacket, step: str, entry: str | None, host: str | None) -> None:
        """A packet the host-side guard dropped for sandbox sid (agent/hostdenials.py), step found there."""
        self._add(sid, "packet", p.family, _proto(p.proto), p.dst, _port(p), step, None, entry, host, "host")

    def dns(self, sid: str, name: str, step: str, entry: str | None) -> None:
        """A query DNS interception refused (no entry allows it, internet off) or answered NXDOMAIN (a
        deny_out entry, or one on its CNAME chain)."""
        self._add(sid, "dns", None, None, None, None, step, name, entry=entry)

    def _add(
        self,
        sid: str,
        kind: str,
        family: int | None,
        proto: str | None,
        dst: str | None,
        dport: int | None,
        step: str,
        name: str | None,
        entry: str | None = None,
        host: str | None = None,
        where: str | None = None,
    ) -> None:
        key: Key = (sid, kind, family, proto, dst, dport, step, name, where)
        event = self._open.get(key)
        if event is not None:
            event.count += 1
            return
        if len(self._open) >= MAX_OPEN:
            self.dropped["agent"] += 1
            return
        if dst is not None and where is None:
            entry, host = self._describe(sid, step, dst)
        now = self._wall()
        self._open[key] = Denial(
            now,
            sid,
            kind,
            family,
            proto,
            dst,
            dport,
            step,
            entry,
            host,
            name,
            opened=self._clock(),
            where=where,
        )

    # --- out ------------------------------------------------------------------------------------------

    def flush(self, everything: bool = False, limit: int | None = None) -> int:
        """Publish the events whose window has closed (all of them: at shutdown), at most limit (the
        oldest first); how many."""
        end = self._clock() - WINDOW
        done = self._closed(end, everything, limit)
        # One `denied` line per event, written together (log_batch: most of an event's cost was the line).
        if done:
            log_batch(logging.INFO, "denied", [self._publish_one(self._open.pop(key)) for key in done])
            self._wake()
        return len(done)

    def _closed(self, end: float, everything: bool, limit: int | None) -> list[Key]:
        """The keys of the windows opened by `end`, oldest first, at most limit. Windows are opened in
        the dict's order (a key is only ever added when its window opens, on a monotonic clock), so they
        are a prefix of it: the walk stops at the first still open. A scan of every open window at each
        slice of 200 took a fifth of the event loop in a flood (10,000 windows open)."""
        done: list[Key] = []
        for key, event in self._open.items():
            if (limit is not None and len(done) >= limit) or (not everything and event.opened > end):
                break
            done.append(key)
        return done

    def _publish_one(self, event: Denial) -> dict[str, Any]:
        """Number, count, keep and publish one event; its fields for the `denied` line."""
        self._seq += 1
        event.seq = self._seq
        self.packets_by[event.step, event.kind] += event.count
        kept = self._kept.get(event.sandbox)
        if kept is None:
            kept = self._kept[event.sandbox] = deque(maxlen=self.keep)
        kept.append(event)
        self._recent.append(event)
        for publish in self._publish:
            try:
                publish(event)
            except Exception as e:  # noqa: BLE001 - one way out failing never stops the others
                self.dropped["publish"] += 1
                log(logging.ERROR, "denials_failed", sandbox=event.sandbox, error=repr(e))
        line = event.doc()
        del line["seq"], line["ts"]
        return line

    def counted(self, denied: dict[str, int]) -> None:
        """The tables' `denied` counters as read (metrics, every counters_interval): what a table counted
        beyond the packets it logged since the last read, its kernel rate limit skipped (`kernel`). An
        estimate: the counter and the log are not read at one instant; a rebuilt table starts again."""
        for sid, packets in denied.items():
            before, logged = self._counted.get(sid), self._logged.pop(sid, 0)
            self._counted[sid] = packets
            if before is not None and packets >= before:
                self.dropped["kernel"] += max(0, packets - before - logged)
        for sid in [s for s in self._counted if s not in denied]:
            del self._counted[sid]

    def publish_to(self, send: Callable[[str, bytes], bool], subject: str) -> None:
        """Also send every event, as JSON, on subject (the NATS feed's connection): an event that cannot
        be sent (no session up) is counted as dropped, reason `nats`, never queued."""

        def publish(event: Denial) -> None:
            if not send(subject, json.dumps(event.doc(), separators=(",", ":")).encode()):
                self.dropped["nats"] += 1

        self._publish.append(publish)

    def _wake(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        try:
            asyncio.get_running_loop().create_task(notify())
        except RuntimeError:  # no loop (tests, shutdown): nobody can be waiting
            return

    async def run(self, interval: float = WINDOW / 4) -> None:
        """Close windows as they end, and let go of the events of sandboxes gone, until cancelled."""
        loop = asyncio.get_running_loop()
        pruned = loop.time()
        while True:
            await asyncio.sleep(interval)
            # In slices, the loop free in between: a flood closes thousands of windows at once, and
            # publishing each costs tens of microseconds (a `status` waited 180 ms behind them).
            while self.flush(limit=FLUSH_SLICE) == FLUSH_SLICE:
                await asyncio.sleep(0)
            if loop.time() - pruned >= PRUNE_EVERY:
                pruned = loop.time()
                for sid in [s for s in self._kept if not self._known(s)]:
                    del self._kept[sid]

    # --- queries --------------------------------------------------------------------------------------

    def events(self, sid: str | None = None, since: float | None = None, after: int = 0) -> list[Denial]:
        """The kept events of one sandbox or of all, oldest first: newer than `since` seconds ago and
        published after `after` (a seq)."""
        source: Iterable[Denial] = self._kept.get(sid, ()) if sid is not None else self._recent
        start = self._wall() - since if since is not None else float("-inf")
        newer: list[Denial] = []
        for e in reversed(source):  # in seq order: from the newest back to the first too old
            if e.seq <= after or e.ts < start:
                break
            newer.append(e)
        return [e for e in reversed(newer) if e.sandbox in self._kept]

    async def wait_after(self, sid: str | None, after: int, timeout: float) -> list[Denial]:
        """Events after `after`, waiting up to timeout seconds for the first (a follower's long poll)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            found = self.events(sid, None, after)
            left = end - loop.time()
            if found or left <= 0:
                return found
            async with self._changed:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), left)

    def recent(self, sid: str, n: int = 5) -> list[dict[str, Any]]:
        """The last n events of a sandbox, newest last, for `status SANDBOX`."""
        kept = self._kept.get(sid, ())
        return [e.doc() for e in list(kept)[-n:]]

    @property
    def last_seq(self) -> int:
        return self._seq

    def info(self) -> dict[str, Any]:
        """For `status`: how much was seen, and lost."""
        return {
            "events": self._seq,
            "open": len(self._open),
            "packets": sum(self.packets_by.values()),
            "dropped": dict(self.dropped),
        }


class Budget:
    """At most `share` of each second spent attributing: a policy may name 4,000 host names, and a flood
    of distinct denials must not take the event loop (beyond it, events go without entry and host)."""

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.share, self._clock = share, clock
        self._second, self._spent, self.skipped = -1, 0.0, 0

    def allows(self) -> bool:
        second = int(self._clock())
        if second != self._second:
            self._second, self._spent = second, 0.0
        if self._spent < self.share:
            return True
        self.skipped += 1
        return False

    def spend(self, seconds: float) -> None:
        self._spent += seconds


def for_agent(reconciler: Reconciler, cache: DnsCache, config: Config, source: object) -> DenialBook | None:
    """The book of a running agent (None: [denials] log = false): entries from the sandbox's policy and the
    DNS cache, host names from there or from the sandbox's own DNS answers (interception); events kept
    while the sandbox is known; published on the feed's connection when it has one (NATS)."""

    budget = Budget(ATTRIBUTION_BUDGET)

    def describe(sid: str, step: str, dst: str) -> tuple[str | None, str | None]:
        d = reconciler.desired.get(sid)
        if d is None or not budget.allows():
            return None, None
        t0 = time.perf_counter()
        entry, host = attribute(step, dst, d.policy, reconciler.config, cache.holding)
        seen = reconciler.proxy.learned(sid, dst) if host is None else None
        if seen is not None and seen[0]:
            host = seen[0][0]
        budget.spend(time.perf_counter() - t0)
        return entry, host

    if not config.denials.log:
        return None
    book = DenialBook(
        config.denials.keep, describe, known=lambda sid: reconciler.desired.get(sid) is not None
    )
    reconciler.proxy.on_refused = book.dns
    send = getattr(source, "publish", None)  # only the NATS feed has a connection to publish on
    if send is not None and config.denials.publish:
        book.publish_to(send, f"{config.denials.subject}.{config.nats.host_id}")
    return book


def pin_denials(running: Config, loaded: Config) -> tuple[Config, list[str]]:
    """A reloaded config, with what the agent's sockets and book were made for at start kept as it was
    (until a restart: only rate and burst apply now), and the keys that would need that restart."""
    old, new = running.denials, loaded.denials
    fixed = ("log", "group", "keep", "publish", "subject")
    changed = [f"denials.{k}" for k in fixed if getattr(old, k) != getattr(new, k)]
    return replace(loaded, denials=replace(new, **{k: getattr(old, k) for k in fixed})), changed
