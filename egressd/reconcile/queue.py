"""A keyed, coalescing work queue: the reconciler's only way to schedule work on a sandbox."""

from __future__ import annotations

import asyncio
from collections import deque


class KeyedQueue:
    """Each key at most once in the queue and at most one worker per key; a key added while its worker
    runs is queued again when that worker is done, so the latest state is always seen."""

    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._queued: set[str] = set()
        self._active: set[str] = set()
        self._dirty: set[str] = set()
        self._ready = asyncio.Event()

    def add(self, key: str, urgent: bool = False) -> None:
        """urgent: ahead of the queue (a table changed by someone else must not wait for a resync pass)."""
        if key in self._active:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            if urgent:
                self._queue.appendleft(key)
            else:
                self._queue.append(key)
            self._ready.set()
        elif urgent:
            self._queue.remove(key)  # O(n), and rare: only tampering and replaced namespaces get here
            self._queue.appendleft(key)

    async def get(self) -> str:
        while not self._queue:
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._queued.discard(key)
        self._active.add(key)
        return key

    def done(self, key: str) -> None:
        self._active.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def __len__(self) -> int:
        return len(self._queue) + len(self._active)

    def idle(self) -> bool:
        return not self._queue and not self._active
