"""What every backend speaks: the reconciler, the CLI and the tests hold a Backend and nothing more.

Three implement it: LibnftBackend (nft.py, the sandbox's own table, in its namespace), HostBackend
(hostside.py, the sandbox's host-side table, keyed by interface name) and FakeBackend (fake.py, in memory).
All three put tables in force through the one TableWriter (writer.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

from egressd.ruleset.exprs import Json
from egressd.ruleset.render import Ruleset
from egressd.ruleset.transactions import Elements


class ApplyError(Exception):
    """nftables refused a transaction; nothing of it is in force."""


def listing_of(rc: int, out: Any, err: str, what: str) -> list[Json] | None:
    """A libnftables `list` reply as a listing; None when the object is not there."""
    if rc != 0:
        if "No such file or directory" in err:
            return None
        raise ApplyError(f"{what}: {err.strip()}")
    return [item for item in out["nftables"] if "metainfo" not in item]


class Backend(Protocol):
    def apply(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        """Put ruleset (and DNS set elements) in force in netns, with no instant in which neither the old
        nor the new policy holds. `listing`: the table as just read, if the caller has it ([]: there is
        none).
        Raises NetnsError or ApplyError."""

    def update_elements(self, netns: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        """Add and delete DNS set elements of the variant in force, in one transaction."""

    def learn(self, netns: str, timeouts: dict[str, int], replace: bool = False) -> None:
        """Addresses from the sandbox's DNS answers into its learned sets, each for its timeout (seconds),
        in one transaction; replace: the sets hold only these afterwards."""

    def read_learned(self, netns: str) -> dict[str, int]:
        """The addresses in the learned sets, with the seconds each has left ({} when there are none)."""

    def read(self, netns: str) -> list[Json] | None:
        """egressd's table in netns as a libnftables listing, or None when there is none."""

    def read_marked(self, netns: str) -> tuple[list[Json] | None, int | None]:
        """read(), and with no table there the namespace's nftables ruleset generation read before it was
        found missing, when the backend can tell (None otherwise): once the table is written, a generation
        one higher proves that no one else committed anything there meanwhile."""

    def fingerprint(self, netns: str) -> str | None:
        """The fingerprint the table in netns carries, or None when there is no table."""

    def set_elements(self, netns: str, names: Iterable[str]) -> dict[str, frozenset[str]] | None:
        """The addresses of each named plain set of egressd's table that exists (a restart adopting a table
        with DNS sets compares them, without a full read); None when they cannot be read that way."""

    def remove(self, netns: str) -> bool:
        """Delete egressd's table in netns; False when there was none."""

    def forget(self, netns: str) -> None:
        """Release everything held for netns (the kernel can then free a dead namespace)."""
