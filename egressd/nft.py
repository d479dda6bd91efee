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

from egressd.netns import ContextCache, NetnsError
from egressd.render import FAMILY, FINGERPRINT_CHAIN, TABLE, Json, Ruleset


class ApplyError(Exception):
    """nftables refused a transaction; nothing of it is in force."""


Elements = Mapping[str, Iterable[str]]


def element_commands(op: str, elements: Elements | None) -> list[Json]:
    """add/delete element commands for the DNS sets, one per non-empty set."""
    out = []
    for name, elems in sorted((elements or {}).items()):
        elem = sorted(elems)
        if elem:
            out.append({op: {"element": {"family": FAMILY, "table": TABLE, "name": name, "elem": elem}}})
    return out


def replace_table(ruleset: Ruleset, elements: Elements | None = None) -> Json:
    """One transaction: create-if-absent, delete, rebuild, fill the DNS sets. All of it, or none."""
    return {
        "nftables": [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            {"delete": {"table": {"family": FAMILY, "name": TABLE}}},
            *ruleset.commands,
            *element_commands("add", elements),
        ]
    }


def set_elements(listing: list[Json], names: Iterable[str]) -> dict[str, frozenset[str]]:
    """The elements the kernel holds in the named (plain, address) sets of a listing."""
    wanted = set(names)
    out: dict[str, frozenset[str]] = {}
    for item in listing:
        obj = item.get("set")
        if obj and obj.get("name") in wanted:
            out[obj["name"]] = frozenset(
                str(ipaddress.ip_address(e)) for e in obj.get("elem", ()) if isinstance(e, str)
            )
    return out


def fingerprint_of(listing: list[Json]) -> str | None:
    """The fingerprint comment in a listing of the table, if the table is there and carries one."""
    for item in listing:
        rule = item.get("rule")
        if rule and rule.get("chain") == FINGERPRINT_CHAIN and "comment" in rule:
            return str(rule["comment"])
    return None


class Backend(Protocol):
    def apply(self, netns: str, ruleset: Ruleset, elements: Elements | None = None) -> None:
        """Replace egressd's table in netns with ruleset (and DNS set elements), atomically.
        Raises NetnsError or ApplyError."""

    def update_elements(self, netns: str, add: Elements, delete: Elements) -> None:
        """Add and delete DNS set elements in one transaction."""

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

    def __init__(self) -> None:
        self._cache = ContextCache(_make_nft)
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def _lock(self, netns: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(netns, threading.Lock())

    def _cmd(self, netns: str, cmd: Json) -> tuple[int, Any, str]:
        nft, _ = self._cache.get(netns)
        with self._lock(netns):
            return nft.json_cmd(cmd)

    def apply(self, netns: str, ruleset: Ruleset, elements: Elements | None = None) -> None:
        rc, _, err = self._cmd(netns, replace_table(ruleset, elements))
        if rc != 0:
            raise ApplyError(f"nftables refused the table for {netns}: {err.strip()}")

    def update_elements(self, netns: str, add: Elements, delete: Elements) -> None:
        cmds = element_commands("delete", delete) + element_commands("add", add)
        if not cmds:
            return
        rc, _, err = self._cmd(netns, {"nftables": cmds})
        if rc != 0:
            raise ApplyError(f"nftables refused the set update for {netns}: {err.strip()}")

    def _list(self, netns: str, what: Json) -> list[Json] | None:
        rc, out, err = self._cmd(netns, {"nftables": [{"list": what}]})
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise ApplyError(f"cannot list egressd's table in {netns}: {err.strip()}")
        return [item for item in out["nftables"] if "metainfo" not in item]

    def read(self, netns: str) -> list[Json] | None:
        return self._list(netns, {"table": {"family": FAMILY, "name": TABLE}})

    def fingerprint(self, netns: str) -> str | None:
        listing = self._list(netns, {"chain": {"family": FAMILY, "table": TABLE, "name": FINGERPRINT_CHAIN}})
        return None if listing is None else fingerprint_of(listing)

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
        self._cache.drop(netns)
        with self._locks_guard:
            self._locks.pop(netns, None)

    def close(self) -> None:
        self._cache.close()


@dataclass
class FakeBackend:
    """In memory, copy-on-apply, with a record of every write; `fail` injects errors per namespace."""

    namespaces: set[str] = field(default_factory=set)
    tables: dict[str, list[Json]] = field(default_factory=dict)
    elements: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    writes: list[tuple[str, str]] = field(default_factory=list)
    fail: Callable[[str, str], Exception | None] | None = None

    def _check(self, netns: str, op: str) -> None:
        if netns not in self.namespaces:
            raise NetnsError(netns, "does not exist (yet); waiting for it to appear", gone=True)
        if self.fail is not None:
            exc = self.fail(netns, op)
            if exc is not None:
                raise exc

    def apply(self, netns: str, ruleset: Ruleset, elements: Elements | None = None) -> None:
        self._check(netns, "apply")
        # Round-trip through JSON, as the real backend does, so later changes to ruleset cannot leak in.
        self.tables[netns] = json.loads(json.dumps(ruleset.commands))
        self.elements[netns] = {name: set((elements or {}).get(name, ())) for name in ruleset.dns_sets}
        self.writes.append(("apply", netns))

    def update_elements(self, netns: str, add: Elements, delete: Elements) -> None:
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
        self._check(netns, "read")
        table = self.tables.get(netns)
        if table is None:
            return None
        listing = [c["add"] for c in copy.deepcopy(table)]
        for item in listing:
            name = item.get("set", {}).get("name")
            elems = self.elements.get(netns, {}).get(name)
            if elems:
                item["set"]["elem"] = sorted(elems)
        return listing

    def fingerprint(self, netns: str) -> str | None:
        listing = self.read(netns)
        return None if listing is None else fingerprint_of(listing)

    def remove(self, netns: str) -> bool:
        self._check(netns, "remove")
        self.writes.append(("remove", netns))
        self.elements.pop(netns, None)
        return self.tables.pop(netns, None) is not None

    def forget(self, netns: str) -> None:
        return None
