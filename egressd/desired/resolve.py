"""The agent's resolver for the host names of the policies (query.py asks the nameservers), and the refresh
loop that keeps the DNS cache current and tells the reconciler which names changed; the reconciler then
updates only the sets of the sandboxes that name them, by difference.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
from collections.abc import Callable, Iterable

from egressd.common.dnsupstream import DNS_PORT, system_nameservers
from egressd.common.logs import log
from egressd.desired.dnscache import RDTYPES, Answer, DnsCache, sort_key
from egressd.desired.query import ENGINE_ENV, DnspythonLookup, WireLookup

# Questions in flight at once (each holds a socket at a high descriptor). 64 capped the refresh rate near
# names / TTL at 10,100 names: whenever the loop stalls (a state file export, a resync) nothing new is sent,
# and the refreshes fell up to a second behind their schedule (python -m bench.dns: 0.96-1.04 of the floor
# at 64, 1.03-1.06 at 256).
MAX_CONCURRENT_QUERIES = 256
EXPIRY_SWEEP = 1.0  # seconds between sweeps for addresses that left their retention window
ENGINES = ("wire", "dnspython")


class Resolver:
    """One record type of one name: CNAME chains followed, TTL the shortest along the chain.

    Nameservers are the given ones, or the host's resolv.conf when none are. A REFUSED or SERVFAIL from one
    nameserver makes the next configured one be asked; only when none answers is it an error, and the
    error names what each nameserver said. engine: "wire" (the lean path, the default) or "dnspython" (the
    old path, for the benchmark's baseline); when not given, $EGRESSD_RESOLVER, else "wire"."""

    def __init__(
        self,
        nameservers: Iterable[str] = (),
        timeout: float = 2.0,
        *,
        port: int = DNS_PORT,
        engine: str | None = None,
    ) -> None:
        servers = list(nameservers) or system_nameservers()
        self.engine = engine or os.environ.get(ENGINE_ENV) or "wire"
        if self.engine not in ENGINES:
            raise ValueError(f"resolver engine {self.engine!r}: one of {', '.join(ENGINES)}")
        lookup = DnspythonLookup if self.engine == "dnspython" else WireLookup
        self._lookup = lookup(servers, timeout, port)

    async def resolve(self, name: str, rdtype: str) -> Answer:
        return await self._lookup.resolve(name, rdtype)


async def resolve_all(resolver: Resolver, name: str) -> dict[str, Answer]:
    """Every record type of one name at once, each judged on its own: for one-shot uses (`apply`,
    `explain`)."""
    answers = await asyncio.gather(*(resolver.resolve(name, t) for t in RDTYPES))
    return dict(zip(RDTYPES, answers, strict=True))


async def resolve_once(cache: DnsCache, resolver: Resolver) -> None:
    """Every name of the cache, every record type, once, each recorded on its own (`egressd apply`); at most
    MAX_CONCURRENT_QUERIES names asked at once (each question in flight holds a socket)."""
    names = list(cache.names)
    limit = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)

    async def one(name: str) -> dict[str, Answer]:
        async with limit:
            return await resolve_all(resolver, name)

    answers = await asyncio.gather(*(one(n) for n in names))
    for name, by_type in zip(names, answers, strict=True):
        for rdtype, answer in by_type.items():
            cache.record(name, rdtype, answer)


class DnsService:
    """The refresh loop: resolves each (name, record type) when due, and reports the names whose addresses
    changed. Types are refreshed apart, so a type that answers is used at once, never held up by the other
    timing out."""

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
        # Due keys wait here, and at most MAX_CONCURRENT_QUERIES are asked at once: a task per key would be
        # 20,000 tasks at a start with 10,000 names (about 25 MiB, most of them waiting for a slot).
        self._waiting: collections.deque[tuple[str, str]] = collections.deque()
        self._asking = 0
        self._inflight: set[tuple[str, str]] = set()  # waiting or asked
        self.queries = 0
        self.failures = 0

    def subscribe(self, sandbox: str, names: Iterable[str]) -> None:
        if self.cache.subscribe(sandbox, names):
            self._wake.set()

    async def run(self) -> None:
        next_expiry = 0.0
        while True:
            self._wake.clear()
            for key in self.cache.due():
                if key not in self._inflight:
                    self._inflight.add(key)
                    self._waiting.append(key)
            while self._waiting and self._asking < MAX_CONCURRENT_QUERIES:
                self._asking += 1
                asyncio.get_running_loop().create_task(self._refresh(*self._waiting.popleft()))
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

    async def _refresh(self, name: str, rdtype: str) -> None:
        try:
            self.queries += 1
            answer = await self.resolver.resolve(name, rdtype)
        finally:
            self._asking -= 1
            self._inflight.discard((name, rdtype))
            self._wake.set()  # a slot is free
        if answer.kind == "error":
            self.failures += 1
            log(logging.WARNING, "dns_failed", host=name, type=rdtype, error=answer.error)
        elif answer.kind == "nxdomain":
            log(logging.WARNING, "dns_nxdomain", host=name, type=rdtype)
        if self.cache.record(name, rdtype, answer):
            log(
                logging.INFO,
                "dns_changed",
                host=name,
                addresses=sorted(self.cache.addresses(name), key=sort_key),
            )
            self.on_change({name})
        self._wake.set()
