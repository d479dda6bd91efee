"""What the kernel holds for each sandbox, as far as this agent knows: one frozen record per sandbox.

A record is replaced whole, on the loop thread, only after the kernel accepted a write (the old Calico Felix
pattern: compute on a copy, commit the bookkeeping on success). The next pass compares the kernel with it to
tell our own earlier write from someone else's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from egressd.kernel.netns import NsId


@dataclass(frozen=True)
class Held:
    netns: str | None = None  # the namespace path holding its table
    written: tuple[str, str] | None = None  # (netns, fingerprint) this agent last wrote or adopted there
    ident: NsId | None = None  # the namespace its path named when it was last synced
    host_iface: str | None = None  # the interface whose host-side table it has
    host_written: tuple[str, str] | None = None  # (interface, fingerprint) last written there
    attempts: int = 0  # failed passes in a row: the retry backoff's exponent


NOTHING_HELD = Held()


class HeldTable:
    """Sandbox id -> Held. An empty record is not kept."""

    def __init__(self) -> None:
        self._by_sid: dict[str, Held] = {}

    def get(self, sid: str) -> Held:
        return self._by_sid.get(sid) or NOTHING_HELD

    def put(self, sid: str, held: Held) -> None:
        if held == NOTHING_HELD:
            self._by_sid.pop(sid, None)
        else:
            self._by_sid[sid] = held

    def hold(self, sid: str, **changes: Any) -> None:
        """One assignment of the sandbox's record with `changes` applied."""
        self.put(sid, replace(self.get(sid), **changes))

    def items(self) -> list[tuple[str, Held]]:
        """A copy: safe to change the table while walking it."""
        return list(self._by_sid.items())

    def tables(self) -> dict[str, str]:
        """Sandbox id -> the namespace path that holds its table, for every table this agent wrote or
        adopted."""
        return {sid: h.netns for sid, h in self._by_sid.items() if h.netns is not None}

    def host_fingerprints(self) -> set[str]:
        return {h.host_written[1] for h in self._by_sid.values() if h.host_written is not None}
