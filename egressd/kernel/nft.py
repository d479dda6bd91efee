"""The real backend, in the sandbox's namespace. Each change is a transaction (see ruleset/transactions.py
for which ones, kernel/writer.py for the algorithm that runs them); the old table and the new one are swapped
so that there is no instant in which neither policy is in force.

Writes go over raw netlink (nfnl_sandbox.py: a socket kept per namespace, no process-wide lock), reads
through libnftables. A write the encoder does not know is logged (once per kind) and goes through
libnftables, as every write does with raw=False.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from egressd.common.logs import log
from egressd.kernel.backend import ApplyError, listing_of
from egressd.kernel.netns import ContextCache, NetnsError, NsId, libc_setns
from egressd.kernel.nfnl import NetlinkError, read_chain_comments
from egressd.kernel.nfnl_elements import ElementSocket
from egressd.kernel.nfnl_encode import EncodeError
from egressd.kernel.nfnl_sandbox import RAW_SOCKETS, SandboxSockets
from egressd.kernel.writer import TableWriter
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import FAMILY, TABLE, Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, Ruleset
from egressd.ruleset.transactions import Elements, fingerprint_of, learn_commands, learned_elements

RAW_WRITES = True  # LibnftBackend's default (benchmarks set it False to measure libnftables writes)
FALLBACK_KINDS = 64  # kinds of fallback logged at most, each once


def _make_nft() -> Any:
    import nftables  # Debian's python3-nftables; imported late so unit tests run without it

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


class LibnftBackend:
    """One netlink transaction per change, no process spawned: over a raw netlink socket kept per namespace
    (raw=True; None: RAW_WRITES), else through a libnftables context cached per namespace, which reads
    use either way."""

    def __init__(
        self, context_limit: int = 256, raw: bool | None = None, raw_sockets: int = RAW_SOCKETS
    ) -> None:
        self._nft_lock = threading.Lock()
        self._cache = ContextCache(_make_nft, limit=context_limit, free_lock=self._nft_lock)
        self._home_nft: Any = None  # for the host-side table, in the namespace egressd runs in
        self._setns = libc_setns()
        raw = RAW_WRITES if raw is None else raw
        self._sockets = SandboxSockets(raw_sockets) if raw else None
        self._fallbacks: set[str] = set()  # kinds of fallback to libnftables already logged
        self._writer = TableWriter(self, ident=self._ident)

    def _ident(self, netns: str) -> NsId | None:
        """The namespace the last write there went to (a kept socket's, or a context's)."""
        raw = self._sockets.ident(netns) if self._sockets is not None else None
        return raw or self._cache.ident(netns)

    def _cmd(self, netns: str, cmd: Json) -> tuple[int, Any, str]:
        # One libnftables call at a time in the whole process: 1.0.6 uses strtok() when it prints set types
        # as JSON, and concurrent listings abort the process or return wrong types. The GIL serialises the
        # Python side anyway; the netlink round trips are short.
        with self._nft_lock, self._letting_go(netns, context=False):  # get() drops a context of a gone path
            nft, _ = self._cache.get(netns)
            return nft.json_cmd(cmd)

    @contextlib.contextmanager
    def _letting_go(self, netns: str, context: bool = True) -> Iterator[None]:
        """A path found unusable (a namespace deleted): its kept socket goes at once, and its libnftables
        context (context=True; not when the lock is held), or either would keep the namespace alive until
        the next call there through it."""
        try:
            yield
        except NetnsError:
            if self._sockets is not None:
                self._sockets.drop(netns)
            if context:
                with self._nft_lock:
                    self._cache.drop(netns)
            raise

    def run(self, netns: str, commands: list[Json], what: str) -> None:
        """One transaction in netns (the TableWriter's Runner): over raw netlink, else (raw=False, a command
        the encoder does not know, no socket to be had) through libnftables. Raises ApplyError (nothing of
        it applied) or NetnsError."""
        if self._sockets is not None:
            try:
                self._sockets.run(netns, commands, what)
                return
            except EncodeError as e:
                self._fall_back("sandbox_batch_unencodable", str(e))
            except OSError as e:  # no socket could be made in the namespace: libnftables may still write
                self._fall_back("sandbox_socket_failed", str(e))
        rc, _, err = self._cmd(netns, {"nftables": commands})
        if rc != 0:
            raise ApplyError(f"nftables refused the {what} for {netns}: {err.strip()}")

    def _fall_back(self, event: str, error: str) -> None:
        """Logged once per kind: the command and what was not understood, without the values."""
        kind = event + " " + re.split(r"[{\['\d]", re.sub(r"^command \d+ ", "", error), maxsplit=1)[0]
        if kind not in self._fallbacks and len(self._fallbacks) < FALLBACK_KINDS:
            self._fallbacks.add(kind)
            log(logging.ERROR, event, error=error, detail="written with libnftables (logged once)")

    def apply(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        self._writer.apply(netns, ruleset, elements, listing)

    def update_elements(self, netns: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        self._writer.update_elements(netns, add, delete, variant)

    def learn(self, netns: str, timeouts: dict[str, int], replace: bool = False) -> None:
        """Through run() (raw netlink, else libnftables); the DNS proxy writes an answer's addresses over
        its own netlink socket (kernel/nfnl_elements.py) and comes here for a replacement."""
        self.run(netns, learn_commands(timeouts, replace=replace), "learned addresses")

    def _list(self, netns: str, what: Json) -> list[Json] | None:
        rc, out, err = self._cmd(netns, {"nftables": [{"list": what}]})
        return listing_of(rc, out, err, f"cannot list egressd's table in {netns}")

    def read_learned(self, netns: str) -> dict[str, int]:
        """The learned sets, one libnftables call each (two `list` commands in one call find only one set):
        what a restarted proxy starts from."""
        out: dict[str, int] = {}
        for name in LEARNED_SETS:
            listing = self._list(netns, {"set": {"family": FAMILY, "table": TABLE, "name": name}})
            out.update(learned_elements(listing or []))
        return out

    def read(self, netns: str) -> list[Json] | None:
        """The table as libnftables lists it."""
        return self.read_marked(netns)[0]

    def read_marked(self, netns: str) -> tuple[list[Json] | None, int | None]:
        """read(), and when there is no table the namespace's ruleset generation read before learning so.
        A new sandbox has none: with raw writes that is first asked over the socket its table is then
        written through, not with a libnftables context made for it (0.4 ms, and the lock). A table made
        right after is handled by the replace a None leads to."""
        if self._sockets is not None:
            try:
                with self._letting_go(netns):
                    present, generation = self._sockets.present(netns)
                if not present:
                    return None, generation
            except (NetlinkError, OSError):
                pass  # the listing says
        return self._list(netns, {"table": {"family": FAMILY, "name": TABLE}}), None

    def set_elements(self, netns: str, names: Iterable[str]) -> dict[str, frozenset[str]] | None:
        """Over a transient raw netlink socket (nfnl_elements.py): no context, no lock, no full listing;
        closing it is quick, as it commits nothing. Raises NetnsError."""
        try:
            with self._letting_go(netns):
                sock = ElementSocket.open(netns, self._setns)
        except OSError:
            return None
        try:
            got = sock.elements(FAMILY, TABLE, names)
        except ApplyError:
            return None
        finally:
            sock.close()
        return {name: frozenset(left) for name, left in got.items()}

    def fingerprint(self, netns: str) -> str | None:
        """Read over a transient raw netlink socket (nfnl.py): no context to make and no lock to wait for,
        which is most of what a restart costs. libnftables is the fallback if that read fails."""
        try:
            with self._letting_go(netns):
                comments = read_chain_comments(netns, TABLE, FINGERPRINT_CHAIN, self._setns)
        except NetlinkError:
            chain = {"chain": {"family": FAMILY, "table": TABLE, "name": FINGERPRINT_CHAIN}}
            listing = self._list(netns, chain)
            return None if listing is None else fingerprint_of(listing)
        return next((c for c in comments or () if c is not None), None)

    def counter(self, netns: str, name: str = "denied") -> tuple[int, int] | None:
        """(packets, bytes) of a named counter of egressd's table; None when there is no such table or
        counter. One libnftables call, under the global lock."""
        listing = self._list(netns, {"counter": {"family": FAMILY, "table": TABLE, "name": name}})
        return counter_of(listing, name)

    def remove(self, netns: str) -> bool:
        if self._sockets is not None:
            try:
                self.run(netns, [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}], "deletion")
            except ApplyError as e:
                if "No such file or directory" in str(e):
                    return False
                raise ApplyError(f"cannot delete egressd's table in {netns}: {e}") from None
            return True
        rc, _, err = self._cmd(
            netns, {"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]}
        )
        if rc != 0:
            if "No such file or directory" in err:
                return False
            raise ApplyError(f"cannot delete egressd's table in {netns}: {err.strip()}")
        return True

    def forget(self, netns: str) -> None:
        self._writer.forget(netns)
        if self._sockets is not None:
            self._sockets.drop(netns)
        with self._nft_lock:
            self._cache.drop(netns)

    def host_cmd(self, cmd: Json) -> tuple[int, Any, str]:
        """One libnftables call in egressd's own namespace (the host-side tables, see hostside.py)."""
        with self._nft_lock:
            if self._home_nft is None:
                self._home_nft = _make_nft()  # threads only visit sandbox namespaces inside ContextCache
            return self._home_nft.json_cmd(cmd)

    def close(self) -> None:
        if self._sockets is not None:
            self._sockets.close()
        with self._nft_lock:  # freeing contexts is a libnftables call too
            self._cache.close()
            self._home_nft = None


def counter_of(listing: list[Json] | None, name: str) -> tuple[int, int] | None:
    """(packets, bytes) of the named counter in a listing."""
    for item in listing or ():
        c = item.get("counter")
        if c and c.get("name") == name:
            return int(c.get("packets", 0)), int(c.get("bytes", 0))
    return None
