"""What the host names of the policies stand for: one cache shared by every sandbox, refreshed by TTL,
each record type (A, AAAA) answered, failing and retried on its own, failing closed.

Pure bookkeeping (which names are wanted, what they resolved to, when to ask again), so its rules are tested
without a network; resolve.py asks the nameservers and runs the refresh loop.
"""

from __future__ import annotations

import heapq
import ipaddress
import random
import socket
import time
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field
from typing import Any

from egressd.common.backoff import backoff_delay

GIVE_UP_AFTER = 5  # consecutive failures after which a name that never resolved counts as settled (empty)
FAILURE_BACKOFF_MAX = 60.0
NXDOMAIN = "NXDOMAIN: no such name"


RDTYPES = ("A", "AAAA")  # each is asked, answered, failing and retried on its own


def rdtype_of(addr: str) -> str:
    """The record type an address comes from."""
    return "AAAA" if ":" in addr else "A"


@dataclass(frozen=True)
class Answer:
    """One record type's outcome for one name."""

    kind: str  # "ok" (addresses, or none: NOERROR with no data), "nxdomain" or "error"
    addresses: tuple[str, ...] = ()
    ttl: float = 0.0
    error: str | None = None


@dataclass
class TypeState:
    """What one record type of one name stands for. A type that fails keeps its own last addresses and is
    retried with backoff while the other type's answers are used at once (one refused AAAA query must never
    throw away a good A answer)."""

    seen: dict[str, float] = field(default_factory=dict)  # address -> when an answer last held it
    current: frozenset[str] = frozenset()  # the latest successful answer
    answered: bool = False  # an answer (addresses, no data, or NXDOMAIN) has come at least once
    nxdomain: bool = False  # the latest answer was NXDOMAIN
    failures: int = 0  # in a row, since the last answer
    error: str | None = None
    next_refresh: float = 0.0
    last_answer: float | None = None
    ttl: float | None = None
    queries: int = 0

    @property
    def gave_up(self) -> bool:
        return not self.answered and self.failures >= GIVE_UP_AFTER

    @property
    def state(self) -> str:
        if self.answered:
            return "failing" if self.failures else "resolved"
        return "failed" if self.gave_up else "resolving"


@dataclass
class NameState:
    name: str
    types: dict[str, TypeState] = field(default_factory=lambda: {t: TypeState() for t in RDTYPES})
    settled: bool = False  # the fail-closed wait for this name is over; once over, it stays over

    def settle(self) -> None:
        """Over when the name is known not to exist, when every type has answered or failed for good, or
        when it stands for an address (whichever type gave it) and every type has come back at least once,
        answered or failed. So a refused AAAA query never holds back a good A answer, yet the first A
        answer does not end the wait while the AAAA query is still under way: its addresses would come a
        moment after `wait` had answered (or after a deny_out name had let the sandbox open). An empty
        answer of one type while the other fails is not enough: the failing type may still give the
        addresses that matter."""
        ts = self.types.values()
        self.settled = self.settled or (
            any(t.nxdomain for t in ts)
            or all(t.answered or t.gave_up for t in ts)
            or (any(t.current for t in ts) and all(t.answered or t.failures for t in ts))
        )

    @property
    def error(self) -> str | None:
        """One line for the name: the types' errors ("A: ...; AAAA: ..."), or the one they share."""
        errors = {t: s.error for t, s in self.types.items() if s.error}
        if errors:
            return join_errors(errors)
        ts = self.types.values()
        if all(t.answered for t in ts) and not any(t.current for t in ts):
            return "no A or AAAA records"
        return None


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
        self._heap: list[tuple[float, str, str]] = []
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
                for rdtype in RDTYPES:
                    self._schedule(name, rdtype, self.clock())
                added.add(name)
        if new:
            self._by_sandbox[sandbox] = new
        else:
            self._by_sandbox.pop(sandbox, None)
        return added

    def _schedule(self, name: str, rdtype: str, when: float) -> None:
        self.names[name].types[rdtype].next_refresh = when
        heapq.heappush(self._heap, (when, name, rdtype))

    def _current(self, when: float, name: str, rdtype: str) -> bool:
        st = self.names.get(name)
        return st is not None and st.types[rdtype].next_refresh == when  # else: rescheduled or gone since

    def due(self) -> list[tuple[str, str]]:
        """(name, record type) pairs whose refresh time has come, each once. A heap keeps this O(log n) per
        name at 10,000s of names: scanning every name on every wake-up starved the loop."""
        now = self.clock()
        out = []
        while self._heap and self._heap[0][0] <= now:
            when, name, rdtype = heapq.heappop(self._heap)
            if self._current(when, name, rdtype):
                out.append((name, rdtype))
        return out

    def next_deadline(self) -> float | None:
        """When the next refresh is due."""
        while self._heap and not self._current(*self._heap[0]):
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def record(self, name: str, rdtype: str, answer: Answer) -> bool:
        """Take one type's answer; True when what the name stands for changed, or it just settled."""
        st = self.names.get(name)
        if st is None:
            return False
        t = st.types[rdtype]
        now = self.clock()
        before, was_settled = self.addresses(name), st.settled
        t.queries += 1
        if answer.kind == "error":
            t.failures += 1
            t.error = answer.error
            backoff = backoff_delay(t.failures - 1, 1.0, FAILURE_BACKOFF_MAX, self.rng, low=0.8)
            self._schedule(name, rdtype, now + backoff)
        else:
            t.failures, t.answered, t.last_answer = 0, True, now
            t.nxdomain = answer.kind == "nxdomain"
            t.current = frozenset(answer.addresses)
            for a in t.current:
                t.seen[a] = now
            if t.nxdomain:
                t.error, ttl = NXDOMAIN, self.max_ttl
            else:
                t.error, ttl = None, answer.ttl
            t.ttl = min(self.max_ttl, max(self.min_ttl, ttl))
            self._schedule(name, rdtype, now + t.ttl * self.rng.uniform(0.9, 1.0))
            self._expire(t, now)
        st.settle()
        return self.addresses(name) != before or st.settled != was_settled

    def _expire(self, t: TypeState, now: float) -> None:
        for a in [a for a, seen in t.seen.items() if a not in t.current and now - seen > self.retention]:
            del t.seen[a]

    def expire(self) -> set[str]:
        """Drop addresses that left their retention window; returns the names whose sets changed."""
        now = self.clock()
        changed = set()
        for st in self.names.values():
            for t in st.types.values():
                if t.failures and t.answered:
                    continue  # this type is failing: keep its last known addresses
                n = len(t.seen)
                self._expire(t, now)
                if len(t.seen) != n:
                    changed.add(st.name)
        return changed

    def addresses(self, name: str) -> frozenset[str]:
        """What the name stands for: each type's latest answer plus addresses seen within the retention
        window."""
        st = self.names.get(name)
        if st is None:
            return frozenset()
        return frozenset().union(*(frozenset(t.seen) | t.current for t in st.types.values()))

    def holds(self, name: str, addr: str) -> bool:
        """addr in addresses(name), without building that set (a denial's attribution asks it of every
        host name of a policy: 4,000 of them at the limit)."""
        st = self.names.get(name)
        t = st.types.get(rdtype_of(addr)) if st is not None else None
        return t is not None and (addr in t.seen or addr in t.current)

    def holding(self, name: str) -> Container[str]:
        """addresses(name), for `in` alone (holds)."""
        return _Holding(self, name)

    def held_since(self, name: str, addr: str) -> tuple[float, bool] | None:
        """How long ago an answer last held addr for name, and whether the latest answer still does (else
        it is only retained); None when the name does not stand for addr."""
        st = self.names.get(name)
        t = st.types[rdtype_of(addr)] if st is not None else None
        if t is None or addr not in t.seen:
            return None
        return round(max(0.0, self.clock() - t.seen[addr]), 1), addr in t.current

    def settled(self, name: str) -> bool:
        st = self.names.get(name)
        return st is not None and st.settled

    def export(self) -> dict[str, object]:
        """What a restart needs to enforce the same addresses at once: no rewrite, no gap while resolving."""
        offset = time.time() - self.clock()
        return {
            name: {
                "settled": st.settled,
                "types": {
                    rdtype: {
                        "seen": {a: seen + offset for a, seen in t.seen.items()},
                        "current": sorted(t.current),
                        "nxdomain": t.nxdomain,
                        "ttl": t.ttl,
                        "next_refresh": t.next_refresh + offset,
                    }
                    for rdtype, t in st.types.items()
                    if t.answered
                },
            }
            for name, st in self.names.items()
            if any(t.answered for t in st.types.values())
        }

    def restore(self, doc: object) -> None:
        """Load export(): only names some sandbox subscribes to again are kept (call after subscribing). A
        document of the format before record types were kept apart is split by address family."""
        if not isinstance(doc, dict):
            return
        offset = time.time() - self.clock()
        for name, item in doc.items():
            st = self.names.get(name)
            if st is None or not isinstance(item, dict):
                continue
            try:
                types = item["types"] if "types" in item else _split_by_family(item)
                loaded = {r: _load_type(r, types[r], offset) for r in RDTYPES if r in types}
            except (KeyError, TypeError, ValueError, AttributeError):
                continue
            for rdtype, t in loaded.items():
                st.types[rdtype] = t
                self._schedule(name, rdtype, min(t.next_refresh, self.clock() + self.max_ttl))
            st.settled = bool(item.get("settled", item.get("resolved")))
            st.settle()

    def view(self, name: str) -> dict[str, object]:
        st = self.names.get(name)
        if st is None:
            return {"name": name, "state": "unknown"}
        now = self.clock()
        ts = st.types.values()
        if st.settled:
            answered = any(t.answered for t in ts)
            state = ("failing" if any(t.failures for t in ts) else "resolved") if answered else "failed"
        else:
            state = "resolving"
        answers = [t.last_answer for t in ts if t.last_answer is not None]
        ttls = [t.ttl for t in ts if t.ttl is not None]
        return {
            "name": name,
            "state": state,
            "addresses": sorted(self.addresses(name), key=sort_key),
            "current": sorted(frozenset().union(*(t.current for t in ts)), key=sort_key),
            "ttl": min(ttls, default=None),
            "refresh_in": round(max(0.0, min(t.next_refresh for t in ts) - now), 1),
            "resolved_ago": round(now - max(answers), 1) if answers else None,
            "error": st.error,
            "queries": sum(t.queries for t in ts),
            "sandboxes": len(self.subscribers.get(name, ())),
            "types": {
                rdtype: {
                    "state": t.state,
                    "current": sorted(t.current, key=sort_key),
                    "ttl": t.ttl,
                    "refresh_in": round(max(0.0, t.next_refresh - now), 1),
                    "failures": t.failures,
                    "error": t.error,
                }
                for rdtype, t in st.types.items()
            },
        }


def _split_by_family(item: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A name saved before record types were kept apart: each type gets the addresses of its family."""
    if not item.get("resolved"):
        return {}
    return {
        rdtype: {
            "seen": {a: t for a, t in item["seen"].items() if rdtype_of(a) == rdtype},
            "current": [a for a in item["current"] if rdtype_of(a) == rdtype],
            "ttl": item.get("ttl"),
            "next_refresh": item["next_refresh"],
        }
        for rdtype in RDTYPES
    }


def _load_type(rdtype: str, item: dict[str, Any], offset: float) -> TypeState:
    """One type of export(); an address of the other family is a ValueError."""

    def address(text: object) -> str:
        a = str(ipaddress.ip_address(text))  # type: ignore[arg-type]
        if rdtype_of(a) != rdtype:
            raise ValueError(f"{a} is not an {rdtype} address")
        return a

    t = TypeState(answered=True, nxdomain=bool(item.get("nxdomain")))
    t.seen = {address(a): float(seen) - offset for a, seen in item["seen"].items()}
    t.current = frozenset(address(a) for a in item["current"])
    t.next_refresh = float(item["next_refresh"]) - offset
    t.ttl = None if item.get("ttl") is None else float(item["ttl"])
    if t.nxdomain:
        t.error = NXDOMAIN
    return t


def sort_key(addr: str) -> tuple[int, bytes]:
    """IPv4 before IPv6, then numerically. inet_pton, not ipaddress: status sorts every name's addresses
    for every sandbox that names it, and ipaddress made that most of a status call."""
    if ":" in addr:
        return 6, socket.inet_pton(socket.AF_INET6, addr)
    return 4, socket.inet_pton(socket.AF_INET, addr)


def join_errors(errors: dict[str, str]) -> str | None:
    """One line for a name's failing record types: the error they share, or "A: ...; AAAA: ..."."""
    if len(errors) == len(RDTYPES) and len(set(errors.values())) == 1:
        return next(iter(errors.values()))
    return "; ".join(f"{t}: {e}" for t, e in errors.items()) or None


class _Holding:
    """One name's addresses as a container: `addr in it` asks the cache (DnsCache.holding)."""

    def __init__(self, cache: DnsCache, name: str) -> None:
        self._cache, self._name = cache, name

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, str) and self._cache.holds(self._name, addr)
