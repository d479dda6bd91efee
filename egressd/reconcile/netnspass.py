"""The sandbox's own table in its namespace: one sync, the bookkeeping after the kernel accepted it, and
letting go of a namespace the sandbox left or that went away.

The reconciler decides what a pass does and records status; this module only talks to the kernel (through
TableSync, in worker threads) and keeps the Held records of namespace tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

from egressd.common.logs import log
from egressd.desired.dnscache import DnsCache
from egressd.desired.store import Desired
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.netns import NetnsError, NsId, netns_id
from egressd.reconcile.held import HeldTable
from egressd.reconcile.hostpass import RunBlocking
from egressd.reconcile.sync import SyncResult, TableSync


def ident_of(path: str | None) -> NsId | None:
    """The namespace a path names now, or None when there is none there."""
    if path is None:
        return None
    try:
        return netns_id(path)
    except NetnsError:
        return None


# Told where a sandbox's table now lives (or None: it has none), and, when the write that made it is known
# to be the only commit there since a ruleset generation, (the namespace, that generation): OnTable.
Since = tuple[NsId, int]
OnTable = Callable[[str, str | None, Since | None], None]


class NetnsPass:
    """Namespace-table work for the reconciler. on_table follows where each sandbox's table lives (the
    daemon points its change monitor at it); owns_netns says whether another sandbox now claims a path."""

    def __init__(
        self,
        backend: Backend,
        sync: TableSync,
        held: HeldTable,
        run: RunBlocking,
        on_table: OnTable | None,
        owns_netns: Callable[[str], bool],
    ) -> None:
        self.backend = backend
        self._sync = sync
        self._held = held
        self._run = run
        self._on_table = on_table
        self._owns_netns = owns_netns

    async def sync(
        self, sid: str, d: Desired, netns: str, ident: NsId | None, cache: DnsCache | None
    ) -> tuple[SyncResult, str | None]:
        """(the result, why the sandbox is held closed if it is). Raises NetnsError or ApplyError."""
        result = await self._adopt_on_hint(sid, d, netns)
        if result is not None:
            return result, None
        ruleset, elements, waiting = self._sync.target(d.policy, cache)
        h = self._held.get(sid)
        same_ns = ident is None or h.ident in (None, ident)
        last_fp = h.written[1] if h.written is not None and h.written[0] == netns and same_ns else None
        result = await self._run(self._sync.sync, self.backend, netns, ruleset, elements, last_fp)
        return result, waiting

    async def _adopt_on_hint(self, sid: str, d: Desired, netns: str) -> SyncResult | None:
        """Restart, first pass: a table that carries the fingerprint the last agent put in force for this very
        record (and config, and version: see TableSync.adoption_key) is adopted on one raw fingerprint read,
        without rendering the policy. Rendering was half of a restart's time. The verification pass right
        after READY renders every policy and compares every table whole, so a renderer that changed within
        one version still gets its tables rewritten. None: take the ordinary path."""
        hint = self._sync.hint_for(sid, d.generation)
        policy = d.policy
        # A sandbox naming host_interface too: its host-side table is the host pass's, rendered there.
        if hint is None or policy.allow_out.hostnames or policy.deny_out.hostnames:
            return None
        fingerprint, shape = hint
        found = await self._run(self.backend.fingerprint, netns)
        if found != fingerprint:
            return None
        return SyncResult("adopted", found, shape, self._sync.digests[shape], 0)

    def commit(self, sid: str, netns: str, ident: NsId | None, result: SyncResult) -> bool:
        """The kernel accepted the sync: what it holds now, in one assignment (even if a newer revision
        overtook this one: the next pass must not take our own write for someone else's). True when the
        shape's digest is new."""
        h = self._held.get(sid)
        if self._on_table is not None and (h.netns != netns or h.ident is None):
            since = None if ident is None or result.before is None else (ident, result.before)
            self._on_table(sid, netns, since)  # a new path, or a new namespace at the same path
        written = (netns, result.fingerprint)
        self._held.put(sid, replace(h, netns=netns, written=written, ident=ident or h.ident, attempts=0))
        return self._sync.learned(result)  # on the loop thread: workers only read the maps

    def moved(self) -> list[tuple[str, str]]:
        """(sandbox, path) for every sandbox whose namespace path now names another namespace, or none. That
        table went with its namespace: a new one there is a first apply, no repair."""
        changed = []
        for sid, h in self._held.items():
            if h.netns is None or h.ident is None:
                continue
            now = ident_of(h.netns)
            if now != h.ident:
                changed.append((sid, h.netns))
                self._held.hold(sid, ident=None, written=None)
                if now is None:
                    self.let_go(sid)
        return changed

    def let_go(self, sid: str) -> None:
        """Its namespace is gone: hold nothing of it (the change monitor's socket, the libnftables context
        would keep it alive). When a namespace appears at the path again, it is a first apply there."""
        path = self._held.get(sid).netns
        self._held.hold(sid, netns=None, written=None)
        if path is not None and self._on_table is not None:
            self._on_table(sid, None, None)  # (the backend drops its context when it finds the path gone)

    async def release(self, sid: str, path: str) -> None:
        """The sandbox left path (deleted, or moved to another namespace): take our table out of it."""
        self._held.hold(sid, netns=None)
        if self._on_table is not None:
            self._on_table(sid, None, None)
        if self._owns_netns(path):
            return  # another sandbox now owns that namespace; its worker rewrites the table
        backend = self.backend

        def remove() -> bool:
            try:
                return backend.remove(path)
            except NetnsError:
                return False
            finally:
                backend.forget(path)

        try:
            removed = await self._run(remove)
        except ApplyError as e:
            log(logging.ERROR, "remove_failed", sandbox=sid, netns=path, error=str(e))
            return
        detail = None if removed else "no table was there"
        log(logging.INFO, "removed", sandbox=sid, netns=path, detail=detail)
