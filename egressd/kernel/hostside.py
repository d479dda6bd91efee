"""The host-side tables: the same decision again, where the sandbox's packets arrive on the host.

A process with CAP_NET_RAW in the sandbox's namespace can send through a packet socket, below the hooks
of the sandbox's own table; one with CAP_NET_ADMIN there can delete that table. Neither reaches the
namespace egressd runs in. For a sandbox whose record names `host_interface` (the host end of its veth or
tap), egressd keeps a table `netdev egressd_<hash of the interface>` in its own namespace, whose one base
chain sits on that interface's ingress hook: it sees every packet the sandbox sends to the host, however it
was sent, and costs nothing to packets of other interfaces.

The ingress hook runs before conntrack, so it cannot tell a reply on a connection opened from outside from
a new packet. A deny there therefore only sets one mark bit (`[enforce] host_mark`), and one static table,
`inet egressd_host`, drops marked packets in prerouting (after conntrack, before destination NAT) unless
conntrack calls them replies. The same table lets marked neighbour discovery through to the host's own
addresses only. The mark cannot come from the sandbox: the kernel clears it when a packet crosses from one
namespace to another over a veth, and a tap's packets start with none.

Why a table per interface and not one shared table: libnftables 1.0.6 loads every object of a table (and,
for element commands, every element of every set in the ruleset) before each transaction. One shared table
made each change cost O(sandboxes): about 110 ms at 1,000 sandboxes. A table per interface costs what the
sandbox's own table costs, whatever the number of sandboxes.

The tables are written over raw netlink (nfnl_batch.py): libnftables 1.0.6 would load every table of the
namespace, with every interval set's elements, before each transaction (0.3-1.6 s at 1,000 tables). They
are read over raw netlink too (nfnl_listing.py; libnftables loads every table to list one, about 10 ms at
1,000). The guard table goes through libnftables.

HostBackend speaks the reconciler's Backend interface, with the interface name where a namespace path
would be, so adoption, digests, drift repair and DNS updates work as for the sandbox's own table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

from egressd.common.logs import log
from egressd.kernel.backend import ApplyError, listing_of
from egressd.kernel.nfnl import NFPROTO_NETDEV, NetlinkError
from egressd.kernel.nfnl_batch import BatchSocket, EncodeError
from egressd.kernel.nfnl_elements import ElementSocket
from egressd.kernel.nfnl_listing import ListingSocket
from egressd.kernel.nfnl_sandbox import PLAIN_SETS
from egressd.kernel.writer import TableWriter
from egressd.model.config import Config, Denials
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, ND_TYPES, Ruleset
from egressd.ruleset.transactions import Elements, fingerprint_of, learn_commands
from egressd.ruleset.variants import Target

T = TypeVar("T")

GUARD_TABLE = "egressd_host"
TABLE_PREFIX = "egressd_"
FAMILY = "netdev"
INGRESS_PRIORITY = -500
# After conntrack (-200): replies are told apart. Before destination NAT (-100): the sandbox's own
# destination is judged, not one a port forward rewrote it to.
GUARD_PRIORITY = -150
NEUTRAL_TABLE = "egressd_host_side"  # what listings call every host-side table, so digests compare


class HostCmd(Protocol):
    def host_cmd(self, cmd: Json) -> tuple[int, Any, str]:
        """One libnftables call in egressd's own namespace."""


def table_name(iface: str) -> str:
    """Interface names may hold characters that table names should not: a fixed-size hash instead."""
    return TABLE_PREFIX + "i" + hashlib.sha256(iface.encode()).hexdigest()[:12]


def target_for(iface: str) -> Target:
    base = {"name": "ingress", "type": "filter", "hook": "ingress", "dev": iface}
    chain = {**base, "prio": INGRESS_PRIORITY, "policy": "accept"}
    return Target(FAMILY, table_name(iface), (chain,))


def guard_commands(mark: int, denials: Denials | None = None) -> list[Json]:
    """The static table that turns marks into drops: replace it whole, in one transaction. With denials,
    what it drops is logged first (prefix "host"), at most `rate` a second per interface (a meter: one
    token bucket per sandbox's interface, in a dynamic set): only here is a reply told apart from a denial.
    The step is not known here; the agent finds it (ruleset/decide.py) for the sandbox of the interface."""
    t = {"family": "inet", "table": GUARD_TABLE}
    meta_mark = {"meta": {"key": "mark"}}

    def eq(left: Json, right: Any, op: str = "==") -> Json:
        return {"match": {"op": op, "left": left, "right": right}}

    marked = eq({"&": [meta_mark, mark]}, 0, "!=")
    clear = {"mangle": {"key": meta_mark, "value": {"&": [meta_mark, 0xFFFFFFFF ^ mark]}}}
    nd = [
        eq({"payload": {"protocol": "icmpv6", "field": "type"}}, {"set": ND_TYPES}),
        eq({"payload": {"protocol": "ip6", "field": "hoplimit"}}, 255),
        eq({"fib": {"result": "type", "flags": ["daddr"]}}, "local"),
    ]
    chain = "prerouting"
    hook = {"type": "filter", "hook": "prerouting", "prio": GUARD_PRIORITY, "policy": "accept"}

    def rule(*expr: Json, comment: str | None = None) -> Json:
        body = {**t, "chain": chain, "expr": list(expr)}
        return {"add": {"rule": {**body, "comment": comment} if comment else body}}

    table = {"family": "inet", "name": GUARD_TABLE}
    logged: list[Json] = []
    comment = f"egressd/1 guard mark {mark:#x}"
    if denials is not None:
        meter = {"type": "iface_index", "flags": ["timeout"], "timeout": 60, "size": 65535}
        limit = {"limit": {"rate": denials.rate, "burst": denials.burst, "per": "second"}}
        per_iface = {
            "set": {"op": "update", "elem": {"meta": {"key": "iif"}}, "set": "@denials", "stmt": [limit]}
        }
        log_it = {"log": {"prefix": "host", "group": denials.group}}
        logged = [{"add": {"set": {**t, "name": "denials", **meter}}}, rule(marked, per_iface, log_it)]
        comment += f" log {denials.group} {denials.rate}/{denials.burst}"
    return [
        {"add": {"table": table}},
        {"delete": {"table": table}},
        {"add": {"table": table}},
        {"add": {"chain": {**t, "name": chain, **hook}}},
        rule(eq({"&": [meta_mark, mark]}, 0), {"accept": None}),
        rule(marked, eq({"ct": {"key": "direction"}}, "reply"), clear, {"accept": None}),
        rule(marked, *nd, clear, {"accept": None}),
        *logged,
        rule(marked, {"counter": None}, {"drop": None}, comment=comment),
    ]


def neutral_listing(listing: list[Json]) -> list[Json]:
    """A listing with its table's name made the same for every interface (and no device): one policy,
    one digest, whichever sandbox's table it is."""
    text = json.dumps(listing)
    out = json.loads(text)
    for item in out:
        for obj in item.values():
            if isinstance(obj, dict):
                if obj.get("table", "").startswith(TABLE_PREFIX):
                    obj["table"] = NEUTRAL_TABLE
                if "name" in obj and "family" in obj and "table" not in obj:  # the table itself
                    obj["name"] = NEUTRAL_TABLE
                obj.pop("dev", None)
    return out


class HostBackend:
    """The Backend interface over the host-side tables; `where` is the sandbox's interface name."""

    def __init__(self, nft: HostCmd, config: Config, raw: bool = True) -> None:
        """raw=False: every write through nft too (unit tests, whose nft is a fake: raw netlink would
        write the machine's own ruleset)."""
        self._nft = nft
        self._raw = raw
        self._mark = config.host_mark
        self._denials = config.denials if config.denials.log else None
        self._guard_checked = False
        self._guard_written = False  # this backend has put the guard in force once
        self._lock = threading.Lock()
        self._writer = TableWriter(self, target_for=target_for)
        self._elements: ElementSocket | None = None  # made at the first learned address; kept for good
        self._elements_lock = threading.Lock()
        self._batches: BatchSocket | None = None  # made at the first write; kept for good
        self._batches_lock = threading.Lock()
        # Sockets for raw reads, idle ones: a reading thread takes one (or makes one) and puts it back, so
        # reads in several workers run at once; kept, as closing a netfilter socket takes the commit lock.
        self._listers: list[ListingSocket] = []
        self._listers_lock = threading.Lock()

    def set_config(self, config: Config) -> None:
        with self._lock:
            denials = config.denials if config.denials.log else None
            if config.host_mark != self._mark or denials != self._denials:
                self._mark, self._denials = config.host_mark, denials
                self._guard_checked = False

    def invalidate(self) -> None:
        """Check the guard table again before the next change (each resync)."""
        with self._lock:
            self._guard_checked = False

    def _run(self, cmds: list[Json], what: str) -> None:
        rc, _, err = self._nft.host_cmd({"nftables": cmds})
        if rc != 0:
            raise ApplyError(f"nftables refused the host-side {what}: {err.strip()}")

    def run(self, where: str, commands: list[Json], what: str) -> None:
        """One transaction on the host (the TableWriter's Runner), over raw netlink (nfnl_batch.py):
        libnftables would load every host-side table before it (docs/performance.md). A command the
        encoder does not know is a bug, logged, and the transaction goes through libnftables."""
        if not self._raw:
            self._run(commands, what)
            return
        with self._batches_lock:
            if self._batches is None:
                try:
                    self._batches = BatchSocket.open(None)
                except OSError as e:
                    raise ApplyError(f"cannot open a netlink socket for the host-side tables: {e}") from None
        try:
            self._batches.run(commands, f"host-side {what}", PLAIN_SETS)
        except EncodeError as e:
            log(logging.ERROR, "host_batch_unencodable", error=str(e), detail="written with libnftables")
            self._run(commands, what)

    def _list(self, what: Json) -> list[Json] | None:
        rc, out, err = self._nft.host_cmd({"nftables": [{"list": what}]})
        return listing_of(rc, out, err, "cannot list the host-side tables")

    def ensure_guard(self, expected: bool = False) -> bool:
        """The guard table, as this config wants it; True when it had to be (re)written. Without it a
        host-side deny would only mark packets. A guard that was there and is gone or altered is logged
        as repaired here, whichever path found it: the resync's check, a host-side table's apply, or the
        adoption of a table after a restart (expected: that table's guard should be there too)."""
        with self._lock:
            if self._guard_checked:
                return False
            listing = self._list({"table": {"family": "inet", "name": GUARD_TABLE}})
            want = guard_commands(self._mark, self._denials)
            found = [i["rule"].get("comment") for i in listing or () if "rule" in i]
            rules = [c["add"]["rule"] for c in want if "rule" in c.get("add", {})]
            have = [i["rule"] for i in listing or () if "rule" in i]
            intact = len(have) == len(rules) and found[-1:] == [rules[-1].get("comment")]
            if not intact:
                self._run(want, "guard table")
                if self._guard_written or listing is not None or expected:
                    detail = "the guard table was missing or not as configured"
                    log(logging.WARNING, "host_guard_repaired", detail=detail)
            self._guard_checked = self._guard_written = True
            return not intact

    def apply(
        self,
        where: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        self.ensure_guard()
        self._writer.apply(where, ruleset, elements, listing)

    def update_elements(self, where: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        self._writer.update_elements(where, add, delete, variant)

    def learn(self, where: str, timeouts: dict[str, int], replace: bool = False) -> None:
        """An answer's addresses over one netlink socket kept for the purpose (kernel/nfnl_elements.py: the
        DNS reply waits for this write, in the event loop); a replacement, which flushes the sets, as
        every other host-side write."""
        if replace or not self._raw:
            self.run(where, learn_commands(timeouts, target_for(where), replace), "learned addresses")
        else:
            with self._elements_lock:
                if self._elements is None:
                    try:
                        self._elements = ElementSocket.open(None)
                    except OSError as e:
                        raise ApplyError(f"cannot open a netlink socket for learned addresses: {e}") from None
            self._elements.learn(FAMILY, table_name(where), LEARNED_SETS, timeouts)

    def set_elements(self, where: str, names: Iterable[str]) -> dict[str, frozenset[str]] | None:
        """Over the learned addresses' socket (raw netlink); None without raw netlink or when it fails."""
        if not self._raw:
            return None
        try:
            with self._elements_lock:
                if self._elements is None:
                    self._elements = ElementSocket.open(None)
            got = self._elements.elements(FAMILY, table_name(where), names)
        except (OSError, ApplyError):
            return None
        return {name: frozenset(left) for name, left in got.items()}

    def read_marked(self, where: str) -> tuple[list[Json] | None, int | None]:
        return self.read(where), None  # host-side tables have no change monitor to spare a check

    def read(self, where: str) -> list[Json] | None:
        """The table, listed over raw netlink (nfnl_listing.py; with raw=False, through libnftables), with
        its name made neutral. A raw read that fails is an ApplyError, never a libnftables listing instead:
        the two list rules differently, and a digest of the one against the other would call the table
        altered."""
        if not self._raw:
            listing = self._list({"table": {"family": FAMILY, "name": table_name(where)}})
            return None if listing is None else neutral_listing(listing)
        chains = [c["name"] for c in target_for(where).base] + [FINGERPRINT_CHAIN]
        try:
            listing = self._listed(lambda lister: lister.read(table_name(where), FAMILY, chains))
        except NetlinkError as e:
            raise ApplyError(f"cannot read the host-side table for {where} over raw netlink: {e}") from None
        return None if listing is None else neutral_listing(listing)

    def _listed(self, question: Callable[[ListingSocket], T]) -> T:
        """question(an idle kept ListingSocket), made if none is idle. Closing a netfilter socket in the
        agent's namespace waits for the kernel's commit lock (about 20 ms while other workers write): the
        sockets are kept. Raises NetlinkError."""
        with self._listers_lock:
            lister = self._listers.pop() if self._listers else None
        try:
            lister = lister or ListingSocket.open()
            answer = question(lister)
        except (OSError, NetlinkError) as e:
            if lister is not None:
                lister.close()  # it may hold part of an answer
            raise NetlinkError(str(e)) from None
        with self._listers_lock:
            self._listers.append(lister)
        return answer

    def fingerprint(self, where: str) -> str | None:
        """Over raw netlink (nfnl.py): libnftables' listing of one chain costs about 10 ms at 1,000
        host-side tables (it allocates every table), and a restart reads one per sandbox. libnftables is
        the fallback if that read fails."""
        try:
            if not self._raw:
                raise NetlinkError("raw netlink is off")
            comments = self._listed(
                lambda ls: ls.comments(table_name(where), FINGERPRINT_CHAIN, NFPROTO_NETDEV)
            )
        except NetlinkError:
            chain = {"family": FAMILY, "table": table_name(where), "name": FINGERPRINT_CHAIN}
            listing = self._list({"chain": chain})
            return None if listing is None else fingerprint_of(listing)
        return next((c for c in comments or () if c is not None), None)

    def remove(self, where: str) -> bool:
        try:
            self.run(
                where, [{"delete": {"table": {"family": FAMILY, "name": table_name(where)}}}], "deletion"
            )
        except ApplyError as e:
            if os.strerror(errno.ENOENT) in str(e):
                return False
            raise ApplyError(f"cannot delete the host-side table for {where}: {e}") from None
        return True

    def forget(self, where: str) -> None:
        self._writer.forget(where)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Delete host-side tables of interfaces no sandbox names any more (sandboxes deleted while no agent
        ran); returns the table names."""
        wanted = {table_name(i) for i in keep}
        if self._raw:  # libnftables' `list tables` loads every table: 77 s at 1,000 host-side tables
            try:
                names = self._listed(lambda lister: lister.table_names(FAMILY))
            except NetlinkError as e:
                raise ApplyError(f"cannot list the host-side tables over raw netlink: {e}") from None
        else:
            names = [
                t["table"]["name"] for t in self._list({"tables": {"family": FAMILY}}) or [] if "table" in t
            ]
        gone = sorted(n for n in names if n.startswith(TABLE_PREFIX) and n not in wanted)
        if gone:
            self.run("", [{"delete": {"table": {"family": FAMILY, "name": n}}} for n in gone], "cleanup")
        return gone
