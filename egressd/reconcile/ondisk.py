"""What the state file on disk may hold, as far as the reconciler must know it: which generation of desired
state was written last, and which sandboxes that file (or the write under way) has a record of.

A sandbox's table may change only once its record is on disk, so a restart never goes back to an older one.
A sandbox no state file holds has no older record to go back to: its first table need not wait for a write.
"""

from __future__ import annotations


class DiskRecords:
    """Told by the persister (through export_state and the daemon) and by the restore at start."""

    def __init__(self) -> None:
        self.generation = 0  # desired state up to this generation is on disk
        self._held: frozenset[str] | None = None  # the sandboxes the file may hold (None: any, until known)
        self._exporting: frozenset[str] = frozenset()  # those of the write under way (one at a time)

    def read(self, ids: frozenset[str]) -> None:
        """The state file read at start names these sandboxes (none: there was no file). Never said when the
        file could not be read: it may hold anything, so every sandbox waits until the first write."""
        self._held = ids

    def exporting(self, ids: frozenset[str]) -> None:
        """A write of these sandboxes' records is under way."""
        self._exporting = ids

    def written(self, generation: int) -> None:
        """The write under way landed: desired state up to `generation`, the records it exported."""
        self.generation = max(self.generation, generation)
        self._held = self._exporting

    def must_wait(self, sid: str, generation: int) -> bool:
        """Whether this desired state of sid must be on disk before its table changes. Not when it already
        is, nor when no file holds and no write under way carries an older record of sid: that wait was the
        largest part of a new sandbox's time to enforced (a whole state write, fsync included)."""
        if generation <= self.generation:
            return False
        return self._held is None or sid in self._held or sid in self._exporting
