"""A sandbox's own table written over raw netlink (issue 19): one nf_tables batch per transaction, sent over
a NETLINK_NETFILTER socket kept per namespace.

libnftables spends 1.5-1.8 ms on a new sandbox's table (a context's cache, JSON parsing, the batch), and
each of its calls holds the process-wide lock (1.0.6 is not thread-safe): a cold start wrote one sandbox at
a time. nfnl_encode turns the same commands into the batch libnftables 1.0.6 sends for them (checked byte for
byte: tests/integration/test_nfnl_sandbox.py), and the writes of different namespaces run at once.

The sockets are kept the way libnftables contexts are (netns.ContextCache), with the same guarantees: each
is made inside its namespace, by path, and the namespace's identity (device and inode) is checked before
every use, so a namespace made again at the same path is never written through a socket of the one before;
a path that is gone lets its socket go at once (the socket would keep the namespace alive), and forget()
lets go of one; at most `limit` are kept, the least recently used let go first. A socket let go of is closed
CLOSE_GRACE_S later by the cache's own thread, when the last reference to it goes (BatchSocket.__del__):
closing a netlink socket within about 30 ms of a commit waits an RCU grace period in the kernel (15-25 ms).
Each lives at a descriptor of 1024 or more (common/fds.py): libnftables, in this process, aborts on a
descriptor that high that it opens itself, so the low ones are left to it.
"""

from __future__ import annotations

from typing import Any

from egressd.common.fds import move_high
from egressd.kernel.netns import ContextCache, NsId
from egressd.kernel.nfnl import netfilter_socket, table_presence
from egressd.kernel.nfnl_batch import BatchSocket
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import TABLE, Json
from egressd.ruleset.render import VARIANTS

RAW_SOCKETS = 256  # kept at most: one descriptor each; making one again costs about 0.1 ms
# Let go of and waiting out CLOSE_GRACE_S at most (their descriptors are high ones: not scarce); beyond, the
# oldest is closed at once, which waits for the kernel when it committed in the last ~30 ms (a burst of
# deletions: each sandbox's socket is let go of right after its table's deletion).
GRAVEYARD = 1024
# The sets element commands name without declaring them in the same batch, and their types: the encoder
# reads nothing from the kernel (what libnftables learns from its cache), and these are all plain sets.
PLAIN_SETS = {
    f"{prefix}{version}_{variant}": "ipv4_addr" if version == "4" else "ipv6_addr"
    for prefix in ("allow_dns", "deny_dns")
    for version in "46"
    for variant in VARIANTS
} | dict(zip(LEARNED_SETS, ("ipv4_addr", "ipv6_addr"), strict=True))


def _batch_socket() -> BatchSocket:
    """Made inside the namespace (ContextCache enters it), at a high descriptor."""
    return BatchSocket(move_high(netfilter_socket()), "its namespace")


class SandboxSockets:
    """A BatchSocket per namespace path (see above). Each socket runs one batch at a time (its own lock);
    batches in different namespaces run at once."""

    def __init__(self, limit: int = RAW_SOCKETS, factory: Any = _batch_socket) -> None:
        self._cache = ContextCache(factory, limit=limit, graveyard=GRAVEYARD)

    def run(self, netns: str, commands: list[Json], what: str) -> None:
        """One transaction in netns. Raises NetnsError (the path is unusable), OSError (no socket could be
        made there), EncodeError (nothing was sent) or ApplyError (refused, naming the command)."""
        sock, _ = self._cache.get(netns)
        sock.run(commands, f"{what} for {netns}", PLAIN_SETS)

    def present(self, netns: str) -> tuple[bool, int]:
        """(whether egressd's table is in netns, the ruleset generation read just before): a new sandbox's
        first read, on the socket its table is then written through. Raises NetnsError, OSError or
        NetlinkError."""
        sock, _ = self._cache.get(netns)
        return sock.ask(lambda s, seq: table_presence(s, TABLE, seq, strict=False), seqs=2)

    def ident(self, netns: str) -> NsId | None:
        """The identity of the namespace netns's socket was made in, if one is kept."""
        return self._cache.ident(netns)

    def drop(self, netns: str) -> None:
        self._cache.drop(netns)

    def __len__(self) -> int:
        return len(self._cache)

    def close(self) -> None:
        self._cache.close()
