"""Desired state to disk in the background: bursts coalesced into one write, spaced so that writing stays a
small share of the agent's time, and a failed write never stops enforcing."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from egressd.common.logs import log
from egressd.desired.statefile import StateError, StateFile

# Eventual state writes (Persister.mark): at least PERSIST_MIN_DELAY after the mark, and about
# PERSIST_SPACING times as long as the last write took, so writing takes at most ~5 % of the agent's time.
PERSIST_MIN_DELAY = 0.05
PERSIST_MAX_DELAY = 5.0
PERSIST_SPACING = 20.0


class Persister:
    """Writes desired state to disk, bursts coalesced into one write; a failed write never stops enforcing."""

    def __init__(
        self, state: StateFile, export: Callable[[], tuple[dict[str, Any], int]], done: Callable[[int], None]
    ) -> None:
        self._done = done
        self._state = state
        self._export = export
        self._lock = asyncio.Lock()
        self._dirty = False
        self._scheduled = False
        self.error: str | None = None
        self.writes = 0
        self.last_write_s = 0.0

    def mark(self) -> None:
        """Something to write eventually. Nothing waits for it (a reconcile that needs its desired state on
        disk calls flush() itself), so writes are spaced to keep the persister's share of the process
        small: a 3.5 MB state file rewritten after every apply made cold starts quadratic."""
        self._dirty = True
        if not self._scheduled:
            self._scheduled = True
            delay = min(PERSIST_MAX_DELAY, max(PERSIST_MIN_DELAY, PERSIST_SPACING * self.last_write_s))
            asyncio.get_running_loop().call_later(delay, self._kick)

    def settle(self) -> None:
        """The reconciler has nothing left to do: write what is pending now, not after the spacing (a restart
        right after a burst finds every table's fingerprint remembered, and adopts it without rendering)."""
        if self._dirty:
            asyncio.get_running_loop().create_task(self.flush())

    def _kick(self) -> None:
        self._scheduled = False
        asyncio.get_running_loop().create_task(self.flush())

    async def flush(self) -> None:
        async with self._lock:
            if not self._dirty:
                return
            self._dirty = False
            t0 = time.monotonic()
            doc, generation = self._export()
            try:
                await asyncio.to_thread(self._state.save, doc)
                self.last_write_s = time.monotonic() - t0
            except (OSError, StateError) as e:
                self._dirty = True
                if self.error != str(e):
                    log(
                        logging.ERROR,
                        "state_write_failed",
                        path=str(self._state.path),
                        error=str(e),
                        detail="enforcement goes on; the state is written again when the disk allows",
                    )
                self.error = str(e)
                asyncio.get_running_loop().call_later(5.0, self.mark)
                return
            self.writes += 1
            self._done(generation)
            if self.error is not None:
                log(logging.INFO, "state_write_recovered", path=str(self._state.path))
            self.error = None
