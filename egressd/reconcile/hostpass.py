"""The host-side part of a sandbox's pass: its table on the host end of its link (kernel/hostside.py), the
guard table every such table relies on, and the clean-up of tables no sandbox names any more.

It runs before the sandbox's own table: the host side needs no namespace, so a sandbox is judged there even
before its namespace exists.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from egressd.common.logs import log
from egressd.desired.dnscache import DnsCache
from egressd.desired.store import Desired
from egressd.kernel.backend import ApplyError, Backend
from egressd.kernel.hostside import HostBackend
from egressd.reconcile.held import HeldTable
from egressd.reconcile.sync import TableSync

RunBlocking = Callable[..., Awaitable[Any]]


class HostPass:
    """Host-side work for the reconciler; `run` puts blocking calls in its worker threads."""

    def __init__(
        self,
        backend: Backend | None,
        sync: TableSync,
        held: HeldTable,
        counters: Counter[str],
        run: RunBlocking,
        observe: Callable[[str, float], None],
    ) -> None:
        self.backend = backend
        self._sync = sync
        self._held = held
        self._counters = counters
        self._run = run
        self._observe = observe

    async def reconcile(self, sid: str, d: Desired, cache: DnsCache | None) -> tuple[str | None, int]:
        """The host-side table of a sandbox that names host_interface: (why it failed, writes made)."""
        iface = d.host_interface
        old = self._held.get(sid).host_iface
        if old is not None and old != iface:
            error = await self.release(sid, old)
            if error is not None:
                return error, 0
        if iface is None:
            return None, 0
        if self.backend is None:
            return "host_interface is set but this agent has no host-side backend", 0
        # Only a sandbox with a namespace has a proxy: without one, its host side enforces no learned address
        # and a deny_out pattern holds it closed (plan.enforced_policy).
        ruleset, elements, _ = self._sync.target(d.policy, cache, host=True, intercept=d.netns is not None)
        last = self._held.get(sid).host_written
        last_fp = last[1] if last is not None and last[0] == iface else None
        t0 = time.monotonic()
        try:
            result = await self._run(self._sync.sync, self.backend, iface, ruleset, elements, last_fp)
        except ApplyError as e:
            self._observe("apply", time.monotonic() - t0)
            self._counters["host_failed"] += 1
            return str(e), 0
        self._observe("apply", time.monotonic() - t0)
        if result.outcome == "adopted" and isinstance(self.backend, HostBackend):
            await self._check_guard(self.backend, expected=True)  # an adopted table relies on it too
        self._held.hold(sid, host_iface=iface, host_written=(iface, result.fingerprint))
        self._sync.learned(result)
        if result.outcome in ("applied", "repaired"):
            self._counters[f"host_{result.outcome}"] += 1
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

    def resync(self, any_host_side: bool) -> None:
        """Each resync checks the shared guard table again (in the background)."""
        if isinstance(self.backend, HostBackend):
            self.backend.invalidate()
            if any_host_side:
                asyncio.get_running_loop().create_task(self._check_guard(self.backend))

    async def _check_guard(self, host: HostBackend, expected: bool = False) -> None:
        """The host-side guard table is shared by every sandbox and changes with none: each resync reads it,
        and puts it back if it is gone or not as the config wants it (`nft flush ruleset` on the host)."""
        try:  # a repair is logged by ensure_guard itself, whichever path finds it first
            await self._run(host.ensure_guard, expected)
        except ApplyError as e:
            log(logging.ERROR, "host_guard_failed", error=str(e))

    async def release(self, sid: str, iface: str) -> str | None:
        """The sandbox no longer names iface (deleted, or moved): take its host-side table out."""
        if self.backend is None:
            return None
        try:
            await self._run(self.backend.remove, iface)
        except ApplyError as e:
            log(logging.ERROR, "host_remove_failed", sandbox=sid, host_interface=iface, error=str(e))
            return str(e)
        self._held.hold(sid, host_iface=None, host_written=None)
        log(logging.INFO, "host_removed", sandbox=sid, host_interface=iface)
        return None

    async def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete host-side tables of interfaces not in keep (sandboxes deleted while no agent ran)."""
        if self.backend is None:
            return []
        try:
            gone: list[str] = await self._run(self.backend.prune, list(keep))
        except ApplyError as e:
            log(logging.ERROR, "host_prune_failed", error=str(e))
            return []
        if gone:
            log(logging.INFO, "host_pruned", tables=len(gone))
        return gone
