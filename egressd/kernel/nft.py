"""Backends that put a rendered table into a namespace: the real one (libnftables) and an in-memory fake.

Both speak the same small interface so the reconciler and the CLI are tested without root against the fake,
and against the kernel in namespaces. Every change is one transaction: the old table and the new one are
swapped atomically, so there is no instant in which neither policy is in force.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from egressd.kernel.netns import ContextCache, NetnsError, NsId, libc_setns
from egressd.kernel.nfnl import NetlinkError, read_chain_comments
from egressd.ruleset.render import (
    FAMILY,
    FINGERPRINT_CHAIN,
    NETNS,
    TABLE,
    VARIANTS,
    Json,
    Ruleset,
    Target,
    create_commands,
    neutral_name,
    stage_commands,
    switch_commands,
    variant_name,
)


class ApplyError(Exception):
    """nftables refused a transaction; nothing of it is in force."""


Elements = Mapping[str, Iterable[str]]


def element_commands(
    op: str, elements: Elements | None, variant: str = "a", target: Target = NETNS
) -> list[Json]:
    """add/delete element commands for the DNS sets of one variant, one per non-empty set."""
    out = []
    for name, elems in sorted((elements or {}).items()):
        elem = sorted(elems)
        if elem:
            set_name = variant_name(name, variant)
            where = {"family": target.family, "table": target.table}
            out.append({op: {"element": {**where, "name": set_name, "elem": elem}}})
    return out


def replace_table(ruleset: Ruleset, elements: Elements | None = None, target: Target = NETNS) -> Json:
    """One transaction: create-if-absent, delete, rebuild, fill the DNS sets. All of it, or none.

    Only for a table that is absent or not ours to trust: an update of our own table goes through
    stage and switch instead (see LibnftBackend.apply)."""
    table = {"family": target.family, "name": target.table}
    return {
        "nftables": [
            {"add": {"table": table}},
            {"delete": {"table": table}},
            *create_commands(ruleset, "a", target),
            *element_commands("add", elements, "a", target),
        ]
    }


def fingerprint_of(listing: list[Json]) -> str | None:
    """The fingerprint comment in a listing of the table, if the table is there and carries one."""
    for item in listing:
        rule = item.get("rule")
        if rule and rule.get("chain") == FINGERPRINT_CHAIN and "comment" in rule:
            return str(rule["comment"])
    return None


def active_variant(listing: list[Json] | None) -> str | None:
    """Which variant the output hook of a listed table uses, or None when the table is not in our shape."""
    for item in listing or ():
        rule = item.get("rule")
        if rule and rule.get("chain") in ("output", "ingress"):
            for expr in rule.get("expr", ()):
                target = expr.get("jump", {}).get("target", "") if isinstance(expr, dict) else ""
                if target.startswith("decide_") and target[len("decide_") :] in VARIANTS:
                    return target[len("decide_") :]
    return None


def retire_commands(listing: list[Json], variant: str, target: Target = NETNS) -> list[Json]:
    """Delete every per-variant object of `variant` found in listing: chains (emptied first), then sets."""
    chains = [
        i["chain"]["name"] for i in listing if "chain" in i and i["chain"]["name"].endswith("_" + variant)
    ]
    sets = [i["set"]["name"] for i in listing if "set" in i and i["set"]["name"].endswith("_" + variant)]
    chains.sort(key=lambda n: not n.startswith("decide"))  # decide jumps to deny: it goes first
    where = {"family": target.family, "table": target.table}
    out: list[Json] = []
    for name in chains:
        out.append({"flush": {"chain": {**where, "name": name}}})
        out.append({"delete": {"chain": {**where, "name": name}}})
    out += [{"delete": {"set": {**where, "name": n}}} for n in sets]
    return out


def other_variant(variant: str) -> str:
    return VARIANTS[1] if variant == VARIANTS[0] else VARIANTS[0]


def update_commands(
    ruleset: Ruleset,
    elements: Elements | None,
    active: str,
    clear: list[Json],
    retire: list[Json],
    target: Target = NETNS,
) -> tuple[str, list[Json], list[Json]]:
    """An update of a table in our shape: (the new variant, its stage transaction, its switch transaction).
    The stage clears leftovers of the unused variant and creates the new policy there; the switch points
    the hooks at it and retires `retire` (the variant in force)."""
    new = other_variant(active)
    stage = clear + stage_commands(ruleset, new, target) + element_commands("add", elements, new, target)
    return new, stage, switch_commands(ruleset, new, retire, target)


def listing_of(rc: int, out: Any, err: str, what: str) -> list[Json] | None:
    """A libnftables `list` reply as a listing; None when the object is not there."""
    if rc != 0:
        if "No such file or directory" in err:
            return None
        raise ApplyError(f"{what}: {err.strip()}")
    return [item for item in out["nftables"] if "metainfo" not in item]


def _own_objects(ruleset: Ruleset, variant: str) -> list[Json]:
    """A listing-shaped list of the per-variant objects a ruleset creates under `variant`."""
    chains = [{"chain": {"name": variant_name(n, variant)}} for n in ("decide", "deny")]
    sets = [
        {"set": {"name": variant_name(n, variant)}}
        for n in sorted(ruleset.names)
        if n not in ("decide", "deny")
    ]
    return chains + sets


def set_elements(listing: list[Json], names: Iterable[str]) -> dict[str, frozenset[str]]:
    """The elements the kernel holds in the named (plain, address) sets, by neutral name."""
    wanted = set(names)
    out: dict[str, frozenset[str]] = {}
    for item in listing:
        obj = item.get("set")
        if obj and neutral_name(obj.get("name", "")) in wanted:
            elems = frozenset(str(ipaddress.ip_address(e)) for e in obj.get("elem", ()) if isinstance(e, str))
            out[neutral_name(obj["name"])] = elems
    return out


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

    def read(self, netns: str) -> list[Json] | None:
        """egressd's table in netns as a libnftables listing, or None when there is none."""

    def fingerprint(self, netns: str) -> str | None:
        """The fingerprint the table in netns carries, or None when there is no table."""

    def remove(self, netns: str) -> bool:
        """Delete egressd's table in netns; False when there was none."""

    def forget(self, netns: str) -> None:
        """Release everything held for netns (the kernel can then free a dead namespace)."""


def _make_nft() -> Any:
    import nftables  # Debian's python3-nftables; imported late so unit tests run without it

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(False)
    return nft


class LibnftBackend:
    """libnftables contexts cached per namespace: one netlink transaction per change, no process spawned."""

    def __init__(self, context_limit: int = 256) -> None:
        self._nft_lock = threading.Lock()
        self._cache = ContextCache(_make_nft, limit=context_limit, free_lock=self._nft_lock)
        self._home_nft: Any = None  # for the host-side table, in the namespace egressd runs in
        self._setns = libc_setns()
        # per namespace: (namespace identity, variant in force, commands that would retire it)
        self._written: dict[str, tuple[NsId | None, str, list[Json]]] = {}

    def _cmd(self, netns: str, cmd: Json) -> tuple[int, Any, str]:
        # One libnftables call at a time in the whole process: 1.0.6 uses strtok() when it prints set types
        # as JSON, and concurrent listings abort the process or return wrong types. The GIL serialises the
        # Python side anyway; the netlink round trips are short.
        with self._nft_lock:
            nft, _ = self._cache.get(netns)
            return nft.json_cmd(cmd)

    def _run(self, netns: str, cmds: Json, what: str) -> None:
        rc, _, err = self._cmd(netns, cmds)
        if rc != 0:
            raise ApplyError(f"nftables refused the {what} for {netns}: {err.strip()}")

    def apply(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        """Two transactions when our table is there: stage the new policy in the unused variant (its sets are
        committed here), then switch the hooks to it and retire the old variant. Between the two both
        variants exist but only the old one is used: the old policy holds until the new one does.

        With `listing`, what the kernel holds decides what is retired. Without it, what this backend wrote
        last decides, which saves a read; should the kernel disagree, a transaction fails, nothing of it
        happens, and the apply is done again from a fresh listing."""
        written = self._written.get(netns)
        if listing is None and written is not None and written[0] == self._cache.ident(netns):
            _, active, retire = written
            try:
                self._stage_and_switch(netns, ruleset, elements, active, [], retire)
                return
            except ApplyError:
                self._written.pop(netns, None)
        if listing is None:
            listing = self.read(netns)
        active = active_variant(listing)
        if listing is None or active is None:  # no table, or not one we can build on: replace it whole
            self._written.pop(netns, None)
            self._run(netns, replace_table(ruleset, elements), "table")
            self._written[netns] = (
                self._cache.ident(netns),
                "a",
                retire_commands(_own_objects(ruleset, "a"), "a"),
            )
            return
        clear = retire_commands(listing, other_variant(active))
        self._stage_and_switch(netns, ruleset, elements, active, clear, retire_commands(listing, active))

    def _stage_and_switch(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None,
        active: str,
        clear: list[Json],
        retire: list[Json],
    ) -> None:
        new, stage, switch = update_commands(ruleset, elements, active, clear, retire)
        self._written.pop(netns, None)
        self._run(netns, {"nftables": stage}, "staged policy")
        self._run(netns, {"nftables": switch}, "switch")
        self._written[netns] = (
            self._cache.ident(netns),
            new,
            retire_commands(_own_objects(ruleset, new), new),
        )

    def update_elements(self, netns: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        cmds = element_commands("delete", delete, variant) + element_commands("add", add, variant)
        if cmds:
            self._run(netns, {"nftables": cmds}, "set update")

    def _list(self, netns: str, what: Json) -> list[Json] | None:
        rc, out, err = self._cmd(netns, {"nftables": [{"list": what}]})
        return listing_of(rc, out, err, f"cannot list egressd's table in {netns}")

    def read(self, netns: str) -> list[Json] | None:
        return self._list(netns, {"table": {"family": FAMILY, "name": TABLE}})

    def fingerprint(self, netns: str) -> str | None:
        """Read over a transient raw netlink socket (nfnl.py): no context to make and no lock to wait for,
        which is most of what a restart costs. libnftables is the fallback if that read fails."""
        try:
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
        rc, _, err = self._cmd(
            netns, {"nftables": [{"delete": {"table": {"family": FAMILY, "name": TABLE}}}]}
        )
        if rc != 0:
            if "No such file or directory" in err:
                return False
            raise ApplyError(f"cannot delete egressd's table in {netns}: {err.strip()}")
        return True

    def forget(self, netns: str) -> None:
        self._written.pop(netns, None)
        with self._nft_lock:
            self._cache.drop(netns)

    def host_cmd(self, cmd: Json) -> tuple[int, Any, str]:
        """One libnftables call in egressd's own namespace (the host-side tables, see hostside.py)."""
        with self._nft_lock:
            if self._home_nft is None:
                self._home_nft = _make_nft()  # threads only visit sandbox namespaces inside ContextCache
            return self._home_nft.json_cmd(cmd)

    def close(self) -> None:
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


@dataclass
class FakeBackend:
    """In memory, copy-on-apply, with a record of every write; `fail` injects errors per namespace."""

    namespaces: set[str] = field(default_factory=set)
    tables: dict[str, list[Json]] = field(default_factory=dict)
    elements: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)
    fail: Callable[[str, str], Exception | None] | None = None
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # netns -> denied (packets, bytes)
    reads: int = 0  # whole-table reads (fingerprint reads are not counted)

    def _check(self, netns: str, op: str) -> None:
        if netns not in self.namespaces:
            raise NetnsError(netns, "does not exist (yet); waiting for it to appear", gone=True)
        if self.fail is not None:
            exc = self.fail(netns, op)
            if exc is not None:
                raise exc

    def apply(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        self._check(netns, "apply")
        # Round-trip through JSON, as the real backend does, so later changes to ruleset cannot leak in.
        self.tables[netns] = json.loads(json.dumps(ruleset.commands))
        self.elements[netns] = {name: set((elements or {}).get(name, ())) for name in ruleset.dns_sets}
        self.writes.append(("apply", netns))

    def update_elements(self, netns: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        self._check(netns, "update")
        sets = self.elements.get(netns, {})
        for name, elems in delete.items():
            if not set(elems) <= sets.get(name, set()):
                raise ApplyError(f"delete of elements not in set {name}")
            sets[name] -= set(elems)
        for name, elems in add.items():
            if name not in sets:
                raise ApplyError(f"no set {name}")
            sets[name] |= set(elems)
        self.writes.append(("update", netns))

    def read(self, netns: str) -> list[Json] | None:
        self.reads += 1
        return self._listing(netns)

    def _listing(self, netns: str) -> list[Json] | None:
        self._check(netns, "read")
        table = self.tables.get(netns)
        if table is None:
            return None
        listing = [c["add"] for c in copy.deepcopy(table)]
        for item in listing:
            name = neutral_name(item.get("set", {}).get("name", ""))
            elems = self.elements.get(netns, {}).get(name)
            if elems:
                item["set"]["elem"] = sorted(elems)
        return listing

    def fingerprint(self, netns: str) -> str | None:
        listing = self._listing(netns)
        return None if listing is None else fingerprint_of(listing)

    def counter(self, netns: str, name: str = "denied") -> tuple[int, int] | None:
        self._check(netns, "counter")
        if netns not in self.tables or name != "denied":
            return None
        return self.counters.get(netns, (0, 0))

    def remove(self, netns: str) -> bool:
        self._check(netns, "remove")
        self.writes.append(("remove", netns))
        self.elements.pop(netns, None)
        return self.tables.pop(netns, None) is not None

    def forget(self, netns: str) -> None:
        return None

    def prune(self, keep: Iterable[str]) -> list[str]:
        """As HostBackend.prune: drop every table not kept (the fake stands in for the host side too)."""
        gone = sorted(set(self.tables) - set(keep))
        for where in gone:
            self.remove(where)
        return gone
