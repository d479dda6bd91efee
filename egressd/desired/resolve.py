"""Asking the nameservers (dnspython) for the host names of the policies, and the refresh loop that keeps the
DNS cache current and tells the reconciler which names changed; the reconciler then updates only the sets
of the sandboxes that name them, by difference.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
from collections.abc import Callable, Iterable

import dns.asyncresolver
import dns.exception
import dns.resolver

from egressd.common.logs import log
from egressd.desired.dnscache import NXDOMAIN, RDTYPES, Answer, DnsCache, sort_key

MAX_CONCURRENT_QUERIES = 64
EXPIRY_SWEEP = 1.0  # seconds between sweeps for addresses that left their retention window


class Resolver:
    """dnspython, asynchronous: one record type of one name, CNAME chains followed, TTL of the whole chain.

    A REFUSED or SERVFAIL from one nameserver makes dnspython ask the next configured one; only when none
    answers is it an error, and the error names what each nameserver said."""

    def __init__(self, nameservers: Iterable[str] = (), timeout: float = 2.0) -> None:
        servers = list(nameservers)
        self._resolver = dns.asyncresolver.Resolver(configure=not servers)
        if servers:
            self._resolver.nameservers = servers
        self._resolver.lifetime = timeout
        # Each nameserver gets its share of the lifetime: one that drops queries leaves time to ask the next.
        self._resolver.timeout = timeout / max(1, len(self._resolver.nameservers))
        self._resolver.cache = None  # our cache is the one that counts; never answer from a second one

    async def resolve(self, name: str, rdtype: str) -> Answer:
        try:
            answer = await self._resolver.resolve(name + ".", rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            return Answer("nxdomain", error=NXDOMAIN)
        except dns.exception.DNSException as e:
            return Answer("error", error=_describe(e))
        if answer.rrset is None:
            return Answer("ok")  # NOERROR with no data: the name has no records of this type
        ttl = answer.chaining_result.minimum_ttl  # the shortest TTL along the CNAME chain
        return Answer("ok", tuple(str(ipaddress.ip_address(r.address)) for r in answer.rrset), float(ttl))


async def resolve_all(resolver: Resolver, name: str) -> dict[str, Answer]:
    """Every record type of one name at once, each judged on its own: for one-shot uses (`apply`,
    `explain`)."""
    answers = await asyncio.gather(*(resolver.resolve(name, t) for t in RDTYPES))
    return dict(zip(RDTYPES, answers, strict=True))


async def resolve_once(cache: DnsCache, resolver: Resolver) -> None:
    """Every name of the cache, every record type, once, each recorded on its own (`egressd apply`)."""
    names = list(cache.names)
    answers = await asyncio.gather(*(resolve_all(resolver, n) for n in names))
    for name, by_type in zip(names, answers, strict=True):
        for rdtype, answer in by_type.items():
            cache.record(name, rdtype, answer)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return "timeout: no answer from the nameservers"
    if isinstance(exc, dns.resolver.NoNameservers):
        said = []
        for server, _tcp, _port, err, _response in exc.kwargs.get("errors", []):
            where = str(server).removeprefix("Do53:").removesuffix("@53")  # "Do53:192.0.2.53@53"
            said.append(f"{err} from {where}")  # err is the rcode's name (REFUSED, SERVFAIL) or an error
        return "no nameserver answered: " + (", ".join(said) or "none configured")
    return f"{type(exc).__name__}: {exc}"


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
        self._limit = asyncio.Semaphore(MAX_CONCURRENT_QUERIES)
        self._inflight: set[tuple[str, str]] = set()
        self.queries = 0
        self.failures = 0

    def subscribe(self, sandbox: str, names: Iterable[str]) -> None:
        if self.cache.subscribe(sandbox, names):
            self._wake.set()

    async def run(self) -> None:
        next_expiry = 0.0
        while True:
            self._wake.clear()
            due = [key for key in self.cache.due() if key not in self._inflight]
            for key in due:
                self._inflight.add(key)
                asyncio.get_running_loop().create_task(self._refresh(*key))
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
            async with self._limit:
                self.queries += 1
                answer = await self.resolver.resolve(name, rdtype)
        finally:
            self._inflight.discard((name, rdtype))
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
