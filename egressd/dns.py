"""Hostname entries: one resolver cache shared by every sandbox, refreshed by TTL, failing closed.

`DnsCache` is pure bookkeeping (which names are wanted, what they resolved to, when to ask again) so its
rules are tested without a network. `Resolver` asks the nameservers with dnspython. `DnsService` runs the
refresh loop and tells the reconciler which names changed; the reconciler then updates only the sets of the
sandboxes that name them, by difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from egressd.logs import log

GIVE_UP_AFTER = 5  # consecutive failures after which a name that never resolved counts as settled (empty)
FAILURE_BACKOFF_MAX = 60.0
MAX_CONCURRENT_QUERIES = 64
EXPIRY_SWEEP = 1.0  # seconds between sweeps for addresses that left their retention window


@dataclass
class Answer:
    kind: str  # "ok", "nxdomain" or "error"
    addresses: list[str] = field(default_factory=list)
    ttl: float = 0.0
    error: str | None = None


@dataclass
class NameState:
    name: str
    seen: dict[str, float] = field(default_factory=dict)  # address -> when an answer last held it
    current: frozenset[str] = frozenset()  # the latest successful answer
    resolved: bool = False  # an answer (addresses, or NXDOMAIN) has come at least once
    failures: int = 0
    error: str | None = None
    next_refresh: float = 0.0
    last_answer: float | None = None
    ttl: float | None = None
    queries: int = 0

    @property
    def settled(self) -> bool:
        """Whether the fail-closed wait for this name is over: it resolved, or failed for good."""
        return self.resolved or self.failures >= GIVE_UP_AFTER


class DnsCache:
    """Which names are wanted by which sandboxes, and what each name stands for right now."""

    def __init__(
        self,
        min_ttl: float,
        max_ttl: float,
        retention: float,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.min_ttl, self.max_ttl, self.retention = min_ttl, max_ttl, retention
        self.clock = clock
        self.rng = rng or random.Random()
        self.names: dict[str, NameState] = {}
        self.subscribers: dict[str, set[str]] = {}
        self._heap: list[tuple[float, str]] = []
        self._by_sandbox: dict[str, frozenset[str]] = {}

    def subscribe(self, sandbox: str, names: Iterable[str]) -> set[str]:
        """Set the names one sandbox lists; returns names new to the cache (to be resolved at once)."""
        new = frozenset(names)
        old = self._by_sandbox.get(sandbox, frozenset())
        for name in old - new:
            subs = self.subscribers.get(name)
            if subs is not None:
                subs.discard(sandbox)
                if not subs:
                    del self.subscribers[name]
                    self.names.pop(name, None)
        added = set()
        for name in new - old:
            self.subscribers.setdefault(name, set()).add(sandbox)
            if name not in self.names:
                self.names[name] = NameState(name)
                self._schedule(self.names[name], self.clock())
                added.add(name)
        if new:
            self._by_sandbox[sandbox] = new
        else:
            self._by_sandbox.pop(sandbox, None)
        return added

    def _schedule(self, st: NameState, when: float) -> None:
        st.next_refresh = when
        heapq.heappush(self._heap, (when, st.name))

    def due(self) -> list[str]:
        """Names whose refresh time has come, each once. A heap keeps this O(log n) per name at 10,000s of
        names: scanning every name on every wake-up starved the loop."""
        now = self.clock()
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, name = heapq.heappop(self._heap)
            st = self.names.get(name)
            if st is not None and st.next_refresh == when:  # else: rescheduled or gone since
                out.append(name)
        return out

    def next_deadline(self) -> float | None:
        """When the next refresh is due."""
        while self._heap:
            when, name = self._heap[0]
            st = self.names.get(name)
            if st is not None and st.next_refresh == when:
                break
            heapq.heappop(self._heap)  # rescheduled or gone since
        return self._heap[0][0] if self._heap else None

    def record(self, name: str, answer: Answer) -> bool:
        """Take an answer; True when what the name stands for changed, or it just settled."""
        st = self.names.get(name)
        if st is None:
            return False
        now = self.clock()
        before, was_settled = self.addresses(name), st.settled
        st.queries += 1
        if answer.kind == "error":
            st.failures += 1
            st.error = answer.error
            backoff = min(FAILURE_BACKOFF_MAX, 2 ** (st.failures - 1)) * self.rng.uniform(0.8, 1.0)
            self._schedule(st, now + backoff)
        else:
            st.failures = 0
            st.resolved = True
            st.last_answer = now
            st.current = frozenset(answer.addresses)
            for a in st.current:
                st.seen[a] = now
            if answer.kind == "nxdomain":
                st.error, ttl = "NXDOMAIN: no such name", self.max_ttl
            else:
                st.error, ttl = (None if answer.addresses else "no A or AAAA records"), answer.ttl
            st.ttl = min(self.max_ttl, max(self.min_ttl, ttl))
            self._schedule(st, now + st.ttl * self.rng.uniform(0.9, 1.0))
            self._expire(st, now)
        return self.addresses(name) != before or st.settled != was_settled

    def _expire(self, st: NameState, now: float) -> None:
        for a in [a for a, t in st.seen.items() if a not in st.current and now - t > self.retention]:
            del st.seen[a]

    def expire(self) -> set[str]:
        """Drop addresses that left their retention window; returns the names whose sets changed."""
        now = self.clock()
        changed = set()
        for st in self.names.values():
            if st.failures and st.resolved:
                continue  # the resolver is failing: keep the last known addresses
            n = len(st.seen)
            self._expire(st, now)
            if len(st.seen) != n:
                changed.add(st.name)
        return changed

    def addresses(self, name: str) -> frozenset[str]:
        """What the name stands for: the latest answer plus addresses seen within the retention window."""
        st = self.names.get(name)
        return frozenset(st.seen) | st.current if st is not None else frozenset()

    def held_since(self, name: str, addr: str) -> tuple[float, bool] | None:
        """How long ago an answer last held addr for name, and whether the latest answer still does (else
        it is only retained); None when the name does not stand for addr."""
        st = self.names.get(name)
        if st is None or addr not in st.seen:
            return None
        return round(max(0.0, self.clock() - st.seen[addr]), 1), addr in st.current

    def settled(self, name: str) -> bool:
        st = self.names.get(name)
        return st is not None and st.settled

    def export(self) -> dict[str, object]:
        """What a restart needs to enforce the same addresses at once: no rewrite, no gap while resolving."""
        offset = time.time() - self.clock()
        return {
            name: {
                "seen": {a: t + offset for a, t in st.seen.items()},
                "current": sorted(st.current),
                "resolved": st.resolved,
                "ttl": st.ttl,
                "next_refresh": st.next_refresh + offset,
            }
            for name, st in self.names.items()
            if st.resolved
        }

    def restore(self, doc: object) -> None:
        """Load export(): only names some sandbox subscribes to again are kept (call after subscribing)."""
        if not isinstance(doc, dict):
            return
        offset = time.time() - self.clock()
        for name, item in doc.items():
            st = self.names.get(name)
            if st is None or not isinstance(item, dict):
                continue
            try:
                seen = {str(ipaddress.ip_address(a)): float(t) - offset for a, t in item["seen"].items()}
                current = frozenset(str(ipaddress.ip_address(a)) for a in item["current"])
                next_refresh = float(item["next_refresh"]) - offset
                ttl = None if item.get("ttl") is None else float(item["ttl"])
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            st.seen, st.current, st.resolved, st.ttl = seen, current, bool(item.get("resolved")), ttl
            self._schedule(st, min(next_refresh, self.clock() + self.max_ttl))

    def view(self, name: str) -> dict[str, object]:
        st = self.names.get(name)
        if st is None:
            return {"name": name, "state": "unknown"}
        now = self.clock()
        if st.resolved:
            state = "failing" if st.failures else "resolved"
        else:
            state = "failed" if st.settled else "resolving"
        return {
            "name": name,
            "state": state,
            "addresses": sorted(self.addresses(name), key=_sort_key),
            "current": sorted(st.current, key=_sort_key),
            "ttl": st.ttl,
            "refresh_in": round(max(0.0, st.next_refresh - now), 1),
            "resolved_ago": None if st.last_answer is None else round(now - st.last_answer, 1),
            "error": st.error,
            "queries": st.queries,
            "sandboxes": len(self.subscribers.get(name, ())),
        }


def _sort_key(addr: str) -> tuple[int, bytes]:
    """IPv4 before IPv6, then numerically. inet_pton, not ipaddress: status sorts every name's addresses
    for every sandbox that names it, and ipaddress made that most of a status call."""
    if ":" in addr:
        return 6, socket.inet_pton(socket.AF_INET6, addr)
    return 4, socket.inet_pton(socket.AF_INET, addr)


class Resolver:
    """dnspython, asynchronous: A and AAAA of one name, CNAME chains followed, TTL of the whole chain."""

    def __init__(self, nameservers: Iterable[str] = (), timeout: float = 2.0) -> None:
        servers = list(nameservers)
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = servers
        self._resolver.lifetime = timeout
        self._resolver.cache = None  # our cache is the one that counts; never answer from a second one

    async def resolve(self, name: str) -> Answer:
        results = await asyncio.gather(*(self._one(name, t) for t in ("A", "AAAA")), return_exceptions=True)
        addresses: list[str] = []
        ttls: list[float] = []
        for r in results:
            if isinstance(r, dns.resolver.NXDOMAIN):
                return Answer("nxdomain")
            if isinstance(r, BaseException):
                return Answer("error", error=_describe(r))
            addrs, ttl = r
            addresses += addrs
            if ttl is not None:
                ttls.append(ttl)
        return Answer("ok", addresses, min(ttls, default=0.0))

    async def _one(self, name: str, rdtype: str) -> tuple[list[str], float | None]:
        answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        if answer.rrset is None:
            return [], None
        ttl = answer.chaining_result.minimum_ttl  # the shortest TTL along the CNAME chain
        return [str(ipaddress.ip_address(r.address)) for r in answer.rrset], float(ttl)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "timeout: no answer from the nameservers"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "SERVFAIL: no nameserver could answer"
    return f"{type(exc).__name__}: {exc}"


class DnsService:
    """The refresh loop: resolves names when due, and reports the names whose addresses changed."""

    def __init__(
        self,
        cache: DnsCache,
        resolver: Resolver,
        on_change: Callable[[set[str]], None],
    ) -> None:
        self.cache = cache
        self.resolver = resolver
        self.on_change = on_change
        self._wake = asyncio.Event()
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        self._inflight: set[str] = set()
        self.queries = 0
        self.failures = 0

    def subscribe(self, sandbox: str, names: Iterable[str]) -> None:
        if self.cache.subscribe(sandbox, names):
            self._wake.set()

    async def run(self) -> None:
        next_expiry = 0.0
        while True:
            self._wake.clear()
            due = [n for n in self.cache.due() if n not in self._inflight]
            for name in due:
                self._inflight.add(name)
                asyncio.get_running_loop().create_task(self._refresh(name))
            now = self.cache.clock()
            if now >= next_expiry:  # retention is counted in seconds: one sweep a second is enough
                next_expiry = now + EXPIRY_SWEEP
                changed = self.cache.expire()
                if changed:
                    self.on_change(changed)
            deadline = min(self.cache.next_deadline() or next_expiry, next_expiry)
            delay = max(0.0, deadline - self.cache.clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(delay, 0.01))

    async def _refresh(self, name: str) -> None:
        try:
            async with self._limit:
                self.queries += 1
                answer = await self.resolver.resolve(name)
        finally:
            self._inflight.discard(name)
        if answer.kind == "error":
            self.failures += 1
            log(logging.WARNING, "dns_failed", host=name, error=answer.error)
        elif answer.kind == "nxdomain":
            log(logging.WARNING, "dns_nxdomain", host=name)
        if self.cache.record(name, answer):
            log(
                logging.INFO,
                "dns_changed",
                host=name,
                addresses=sorted(self.cache.addresses(name), key=_sort_key),
            )
            self.on_change({name})
        self._wake.set()
