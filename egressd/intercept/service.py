"""The DNS proxy: every query of an intercepted sandbox is judged by name (ruleset/names.py), forwarded
from the agent's own namespace when the policy allows it, and answered only after the addresses of an
allowed answer are in the kernel (its learned sets, and its host-side table's). If that write fails the
sandbox gets SERVFAIL, never an answer it cannot use; a refused or denied name never leaves the host.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.rcode

from egressd.common.dnsupstream import NoAnswer, Unusable, ask_each, system_nameservers
from egressd.common.dnswire import WireError
from egressd.common.logs import log
from egressd.intercept import wire as fast
from egressd.intercept.messages import (
    Learned,
    Query,
    QueryError,
    parse_query,
    read_answer,
    reply,
    sandbox_reply,
    to_wire,
    upstream_query,
)
from egressd.intercept.site import Site
from egressd.intercept.wire import FastAnswer, FastQuery
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.dnssock import ProxySockets, open_proxy_sockets
from egressd.kernel.netns import NetnsError, NsId, netns_id
from egressd.model.config import Config
from egressd.model.entries import within
from egressd.model.sandbox import Policy
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import FAMILY, TABLE
from egressd.ruleset.names import FORWARD, NXDOMAIN, NameVerdict, judge_chain, judge_name

OUTCOMES = ("forwarded", "refused", "nxdomain", "servfail", "rate_limited")
REFUSED_LOG_INTERVAL = 1.0  # at most one dns_refused line per sandbox per second
RunBlocking = Callable[..., Awaitable[Any]]
Forward = Callable[[bytes], Awaitable[bytes | None]]  # a question's wire form -> the answer's


@dataclass
class Sandbox:
    """What the proxy knows of one sandbox: where it answers, what it may ask, what it learned."""

    netns: str
    policy: Policy
    host_iface: str | None
    site: Site | None = None
    expiry: dict[str, float] = field(default_factory=dict)  # learned address -> monotonic expiry
    names: dict[str, set[str]] = field(default_factory=dict)  # learned address -> the names it answered
    since: dict[str, float] = field(default_factory=dict)  # learned address -> when it was last written
    logged_at: float = 0.0


def nameservers(config: Config) -> list[str]:
    """[dns] nameservers, or the host's resolv.conf: the agent's own resolvers."""
    if config.dns_nameservers:
        return list(config.dns_nameservers)
    return system_nameservers()


class Interceptor:
    """Per sandbox one Site; `run` puts blocking kernel writes in the reconciler's worker threads."""

    def __init__(
        self,
        config: Config,
        backend: Backend,
        host_backend: Backend | None,
        run: RunBlocking,
        serving: bool = True,
        open_sockets: Callable[[str, int], ProxySockets] = open_proxy_sockets,
        forward: Forward | None = None,
        observe: Callable[[str, float], None] | None = None,
    ) -> None:
        """serving=False: nothing listens (a one-shot `egressd apply`, the reconciler's unit tests).
        open_sockets and forward: where sockets come from and how a question is asked upstream (tests)."""
        self.serving = serving
        self._open = open_sockets
        self._forward = forward or self._ask_upstream
        self.config = config
        self._backend = backend
        self._host_backend = host_backend
        self._run = run
        self._servers = nameservers(config)
        self.sandboxes: dict[str, Sandbox] = {}
        self.counts: Counter[str] = Counter(dict.fromkeys(OUTCOMES, 0))
        self._observe = observe  # told ("dns_answer", seconds) for each answer (metrics)
        # told (sandbox, query name, step, entry) of every query refused or answered NXDOMAIN (denials)
        self.on_refused: Callable[[str, str, str, str | None], None] | None = None

    def set_config(self, config: Config) -> None:
        self.config = config
        self._servers = nameservers(config)

    async def ensure(self, sid: str, netns: str, policy: Policy, host_iface: str | None) -> None:
        """The sandbox's proxy listening in netns, for this policy. Raises NetnsError or OSError."""
        sb = self.sandboxes.get(sid)
        if (
            sb is not None
            and sb.site is not None
            and sb.netns == netns
            and _same_ns(netns, sb.site.sockets.ident)
        ):
            if policy.allow_out != sb.policy.allow_out:
                await self._relearn(sb, policy, host_iface)
            sb.policy, sb.host_iface = policy, host_iface
            return
        await self.release(sid)
        sockets, left = await self._run(self._open_site, netns)
        sb = Sandbox(netns, policy, host_iface)
        now = time.monotonic()
        sb.expiry = {addr: now + seconds for addr, seconds in left.items()}
        sb.site = Site(
            sid, sockets, self.config.intercept, lambda wire, size: self.answer(sid, wire, size), self.counts
        )
        await sb.site.start()
        self.sandboxes[sid] = sb
        log(logging.INFO, "dns_intercepting", sandbox=sid, netns=netns, port=self.config.intercept.port)

    async def listen(
        self, sid: str, netns: str, policy: Policy, host_iface: str | None, wanted: bool
    ) -> tuple[str, bool] | None:
        """ensure() when the sandbox's DNS is intercepted, release() when not; (why it failed, whether the
        namespace is missing) when it cannot listen."""
        if not wanted or not self.serving:
            await self.release(sid)
            return None
        try:
            await self.ensure(sid, netns, policy, host_iface)
        except NetnsError as e:
            return e.reason, e.gone
        except OSError as e:
            return f"the DNS proxy cannot listen on port {self.config.intercept.port}: {e}", False
        return None

    def _open_site(self, netns: str) -> tuple[ProxySockets, dict[str, int]]:
        """In a worker thread: the sockets, and the learned addresses the kernel already holds with their
        seconds left, read over the new netlink socket (the backend when there is none). A proxy (re)started
        over such a table (the agent restarted) takes their times from the kernel, so a shorter answer never
        shortens one. Which names gave them is not known: a policy that allows other names lets them go
        (see _relearn). Raises NetnsError or OSError."""
        sockets = self._open(netns, self.config.intercept.port)
        try:
            if sockets.elements is not None:
                return sockets, sockets.elements.read(FAMILY, TABLE, LEARNED_SETS)
            return sockets, self._backend.read_learned(netns)
        except ApplyError as e:
            log(logging.WARNING, "dns_learned_unreadable", netns=netns, error=str(e))
            return sockets, {}

    async def release(self, sid: str) -> None:
        """Close the sandbox's sockets: they would keep its namespace alive."""
        sb = self.sandboxes.pop(sid, None)
        if sb is not None and sb.site is not None:
            sb.site.close()
            if sb.site.sockets.elements is not None:
                await self._run(sb.site.sockets.elements.close)

    def view(self, sid: str, limit: int = 20) -> dict[str, Any] | None:
        """What `status` shows of a sandbox's proxy: the addresses it learned (the first `limit`, with the
        names that gave them and seconds left), None when its DNS is not intercepted."""
        sb = self.sandboxes.get(sid)
        if sb is None:
            return None
        now = time.monotonic()
        live = sorted((a, t) for a, t in sb.expiry.items() if t > now)
        shown = [
            {"address": a, "names": sorted(sb.names.get(a, ())), "expires_in": round(t - now)}
            for a, t in live
        ]
        return {"learned": len(live), "addresses": shown[:limit]}

    def learned(self, sid: str, address: str) -> tuple[list[str], float, float] | None:
        """The names whose answers put address in the sandbox's learned sets, seconds since, seconds left."""
        sb = self.sandboxes.get(sid)
        now = time.monotonic()
        if sb is None or sb.expiry.get(address, 0.0) <= now:
            return None
        since = sb.since.get(address, now)
        return sorted(sb.names.get(address, ())), now - since, sb.expiry[address] - now

    def learned_total(self) -> int:
        now = time.monotonic()
        return sum(1 for sb in self.sandboxes.values() for t in sb.expiry.values() if t > now)

    def close(self) -> None:
        for sb in self.sandboxes.values():
            if sb.site is not None:
                sb.site.close()
                if sb.site.sockets.elements is not None:
                    sb.site.sockets.elements.close()
        self.sandboxes.clear()

    async def answer(self, sid: str, wire: bytes, max_size: int) -> bytes | None:
        """One query of the sandbox, start to end; None: nothing is sent (not a query). A plain query takes
        the fast path (wire.py), anything else dnspython's (messages.py)."""
        t0 = time.monotonic()
        sb = self.sandboxes.get(sid)
        if sb is None:
            return None
        query: FastQuery | Query
        try:
            query = fast.parse_query(wire)
        except WireError:
            try:
                query = parse_query(wire)
            except QueryError as e:
                return None if e.reply is None else to_wire(e.reply, max_size or 512)
        out = await self._decide(sid, sb, query, wire, max_size or query.payload)
        if self._observe is not None:
            self._observe("dns_answer", time.monotonic() - t0)
        return out

    async def _decide(self, sid: str, sb: Sandbox, query: FastQuery | Query, wire: bytes, size: int) -> bytes:
        verdict = judge_name(sb.policy, query.name)
        if verdict.action != FORWARD:
            return self._refuse(sid, sb, query, verdict, str(verdict), size)
        read = await self._ask(query, wire)
        if read is None:
            return self._empty(query, dns.rcode.SERVFAIL, size, "servfail")
        query, answer, found = read
        verdict = judge_chain(sb.policy, found.chain)
        if verdict.action == NXDOMAIN:
            return self._refuse(sid, sb, query, verdict, f"{verdict} (on the CNAME chain)", size)
        blocked = self.config.guard.deny
        usable = {a: t for a, t in found.addresses.items() if not within(a, blocked)}
        if verdict.learn and usable and not await self._learn(sid, sb, usable, query.name):
            return self._empty(query, dns.rcode.SERVFAIL, size, "servfail")
        self.counts["forwarded"] += 1
        if isinstance(query, FastQuery):
            return fast.reply(query, answer, self.config.dns_max_ttl, blocked, size)
        return to_wire(sandbox_reply(query, answer, found, self.config.dns_max_ttl, blocked), size)

    async def _ask(
        self, query: FastQuery | Query, wire: bytes
    ) -> tuple[FastQuery | Query, Any, FastAnswer | Learned] | None:
        """The question upstream and its answer read: (the query as read, the answer, its chain and
        addresses); the query as dnspython reads it when the answer is not for the fast path. None: no
        usable answer."""
        plain = isinstance(query, FastQuery)
        data = await self._forward(
            fast.upstream_question(query) if plain else upstream_query(query).to_wire()
        )
        if data is None:
            return None
        try:
            if isinstance(query, FastQuery):
                try:
                    answer = fast.read_answer(query, data)
                    return query, answer, answer
                except WireError:  # a rich or odd answer: dnspython reads it, from the query up
                    query = parse_query(wire)
            message, found = read_answer(query, data)
        except (dns.exception.DNSException, QueryError) as e:
            log(logging.WARNING, "dns_upstream_unreadable", name=query.name, error=str(e))
            return None
        return query, message, found

    def _empty(self, query: FastQuery | Query, rcode: int, size: int, outcome: str) -> bytes:
        self.counts[outcome] += 1
        if isinstance(query, FastQuery):
            return fast.refusal(query, rcode)
        return to_wire(reply(query.message, rcode), size)

    def _refuse(
        self, sid: str, sb: Sandbox, query: FastQuery | Query, verdict: NameVerdict, why: str, size: int
    ) -> bytes:
        now = time.monotonic()
        if now - sb.logged_at >= REFUSED_LOG_INTERVAL:
            sb.logged_at = now
            log(logging.INFO, "dns_refused", sandbox=sid, name=query.name, type=query.rdtype, detail=why)
        if self.on_refused is not None:
            try:
                self.on_refused(sid, query.name, verdict.step, verdict.entry)
            except Exception as e:  # noqa: BLE001 - a report must never cost the sandbox its answer
                log(logging.ERROR, "denials_failed", sandbox=sid, error=repr(e))
        if verdict.action == NXDOMAIN:
            return self._empty(query, dns.rcode.NXDOMAIN, size, "nxdomain")
        return self._empty(query, dns.rcode.REFUSED, size, "refused")

    async def _ask_upstream(self, question: bytes) -> bytes | None:
        """The question to each of the agent's resolvers in turn (UDP, TCP when truncated; a SERVFAIL or
        REFUSED passed over for the next), from the agent's own namespace; None when none answers."""
        answer = await ask_each(question, self._servers, self.config.dns_timeout, _not_refused)
        return None if isinstance(answer, NoAnswer) else answer

    async def _relearn(self, sb: Sandbox, policy: Policy, host_iface: str | None) -> None:
        """A policy that allows other names: the learned sets keep only the addresses of names it still
        allows, before the new table (and its new generation) is written, so no connection to an address
        only the old policy allowed is carried on. Addresses learned before a restart are not remembered:
        they go too (the sandbox asks again). Raises ApplyError or NetnsError: the sandbox is retried."""
        now = time.monotonic()
        keep = {
            addr: int(expiry - now) + 1
            for addr, expiry in sb.expiry.items()
            if expiry > now + 1 and any(judge_name(policy, n).learn for n in sb.names.get(addr, ()))
        }
        await self._run(self._backend.learn, sb.netns, keep, True)
        if host_iface is not None and self._host_backend is not None:
            await self._run(self._host_backend.learn, host_iface, keep, True)
        sb.expiry = {a: t for a, t in sb.expiry.items() if a in keep}
        sb.names = {a: n for a, n in sb.names.items() if a in keep}

    async def _learn(self, sid: str, sb: Sandbox, ttls: dict[str, float], name: str) -> bool:
        """Commit the answer's addresses, each for its TTL clamped to [min_ttl, max_ttl] plus retention;
        only those whose time would grow by more than a tenth of the retention (at least 1 s): an address
        answered again and again is written once a minute (the default retention), not at every answer,
        and still outlives the answer's TTL by nine tenths of the retention. The bookkeeping only after
        the kernel accepted them."""
        cfg = self.config
        now = time.monotonic()
        for addr in [a for a, t in sb.expiry.items() if t <= now]:
            del sb.expiry[addr]
            sb.names.pop(addr, None)
            sb.since.pop(addr, None)
        timeouts = {}
        slack = max(1.0, cfg.dns_retention / 10)
        for addr, ttl in ttls.items():
            timeout = int(min(max(ttl, cfg.dns_min_ttl), cfg.dns_max_ttl) + cfg.dns_retention)
            if sb.expiry.get(addr, 0.0) < now + timeout - slack:
                timeouts[addr] = timeout
        if not timeouts:
            return True
        if len(sb.expiry) + len([a for a in timeouts if a not in sb.expiry]) > cfg.intercept.max_learned:
            log(logging.WARNING, "dns_learned_full", sandbox=sid, limit=cfg.intercept.max_learned)
            return False  # full fails closed
        try:
            if sb.site is not None and sb.site.sockets.elements is not None:
                self._write(sb, timeouts)  # in the loop: see _write
            else:
                await self._run(self._write, sb, timeouts)
        except (ApplyError, NetnsError) as e:
            log(logging.ERROR, "dns_learn_failed", sandbox=sid, error=str(e))
            return False
        for addr, timeout in timeouts.items():
            sb.expiry[addr], sb.since[addr] = now + timeout, now
        for addr in ttls:
            sb.names.setdefault(addr, set()).add(name)
        return True

    def _write(self, sb: Sandbox, timeouts: dict[str, int]) -> None:
        """The sandbox's table over the netlink socket made with its listeners (the backend when there is
        none), then the host side's. With that socket it runs in the event loop: the kernel takes the batch
        within sendmsg (about 0.06 ms), and the one thing it can wait for is the namespace's nf_tables
        commit lock, which only egressd's own writes hold there (the workload holds no CAP_NET_ADMIN over
        it: docs/threat-model.md). A worker thread cost more than the write (about 0.5 ms measured on a
        busy host), and answers would queue behind table applies."""
        elements = sb.site.sockets.elements if sb.site is not None else None
        if elements is not None:
            elements.learn(FAMILY, TABLE, LEARNED_SETS, timeouts)
        else:
            self._backend.learn(sb.netns, timeouts)
        if sb.host_iface is not None and self._host_backend is not None:
            self._host_backend.learn(sb.host_iface, timeouts)


def _not_refused(data: bytes) -> bytes:
    if data[3] & 0xF in (dns.rcode.SERVFAIL, dns.rcode.REFUSED):
        raise Unusable(dns.rcode.to_text(data[3] & 0xF))
    return data


def _same_ns(path: str, ident: NsId) -> bool:
    try:
        return netns_id(path) == ident
    except NetnsError:
        return False
