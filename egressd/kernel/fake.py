"""The fake backend: tables in memory, changed only by running the same transactions the kernel is given.

FakeKernel interprets libnftables JSON commands the way the kernel does where egressd can tell: a
transaction applies whole or not at all; `add` of an existing object does nothing and `create` refuses it;
`delete` of a missing object fails; a chain with rules, or one a rule jumps to, cannot be deleted, nor can a
set a rule reads; a rule may only name chains and sets that exist. So the stage-and-switch sequence of
kernel/writer.py runs here exactly as on the kernel, and unit tests see its mistakes without root.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from egressd.kernel.backend import ApplyError
from egressd.kernel.hostside import neutral_listing, target_for
from egressd.kernel.netns import NetnsError
from egressd.kernel.writer import TableWriter
from egressd.ruleset.exprs import Json
from egressd.ruleset.render import Ruleset
from egressd.ruleset.transactions import (
    Elements,
    active_variant,
    fingerprint_of,
    learn_commands,
    learned_elements,
)
from egressd.ruleset.variants import neutral_name, variant_name

NOENT = "No such file or directory"
EXIST = "File exists"
BUSY = "Device or resource busy"
DNS_SET_SUFFIXES = ("_dns4", "_dns6")


class Refused(Exception):
    """One command the kernel would refuse; the whole transaction is then undone."""


def _refs(obj: Any) -> Iterator[tuple[str, str]]:
    """("chain", name) for every jump/goto and ("set", name) for every @set a rule's expressions name."""
    if isinstance(obj, list):
        for o in obj:
            yield from _refs(o)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            if key in ("jump", "goto") and isinstance(value, dict):
                yield "chain", str(value.get("target"))
            else:
                yield from _refs(value)
    elif isinstance(obj, str) and obj.startswith("@"):
        yield "set", obj[1:]


def _elem_key(e: Any) -> str:
    """An element's identity: its value (a timeout is a property of the element, not part of it)."""
    if isinstance(e, dict) and isinstance(e.get("elem"), dict):
        e = e["elem"].get("val")
    return json.dumps(e, sort_keys=True)


class _Table:
    """One table being changed by a transaction: its objects in creation order, as {"add": {kind: obj}}."""

    def __init__(self, items: list[Json]) -> None:
        self.items = items

    def find(self, kind: str, name: str) -> Json | None:
        for item in self.items:
            obj = item["add"].get(kind)
            if obj is not None and obj.get("name") == name:
                return obj
        return None

    def rules(self, chain: str | None = None) -> list[Json]:
        rules = [i["add"]["rule"] for i in self.items if "rule" in i["add"]]
        return [r for r in rules if chain is None or r.get("chain") == chain]

    def referenced(self, kind: str, name: str) -> bool:
        return any((kind, name) in set(_refs(r.get("expr", []))) for r in self.rules())

    def drop(self, keep: Callable[[Json], bool]) -> None:
        self.items = [i for i in self.items if keep(i["add"])]

    def command(self, verb: str, kind: str, obj: Json) -> None:
        name = str(obj.get("name", ""))
        if kind == "rule":
            self._rule(verb, obj)
        elif kind == "element":
            self._element(verb, obj)
        elif kind in ("chain", "set", "counter"):
            self._object(verb, kind, name, obj)
        else:
            raise Refused(f"the fake kernel does not interpret {verb} {kind}")

    def _rule(self, verb: str, obj: Json) -> None:
        if verb != "add":
            raise Refused(f"the fake kernel does not interpret {verb} rule")
        if self.find("chain", str(obj.get("chain"))) is None:
            raise Refused(f"{NOENT}: chain {obj.get('chain')}")
        for kind, name in _refs(obj.get("expr", [])):
            if self.find(kind, name) is None:
                raise Refused(f"{NOENT}: {kind} {name}")
        self.items.append({"add": {"rule": obj}})

    def _element(self, verb: str, obj: Json) -> None:
        target = self.find("set", str(obj.get("name")))
        if target is None:
            raise Refused(f"{NOENT}: set {obj.get('name')}")
        have = {_elem_key(e): e for e in target.get("elem", [])}
        for e in obj.get("elem", []):
            key = _elem_key(e)
            if verb == "delete" and key not in have:
                raise Refused(f"{NOENT}: element {e} of set {obj.get('name')}")
            if verb == "create" and key in have:
                raise Refused(f"{EXIST}: element {e} of set {obj.get('name')}")
            if verb == "delete":
                del have[key]
            else:
                have[key] = e
        target["elem"] = list(have.values())

    def _object(self, verb: str, kind: str, name: str, obj: Json) -> None:
        found = self.find(kind, name)
        if verb in ("add", "create"):
            if found is not None and verb == "create":
                raise Refused(f"{EXIST}: {kind} {name}")
            if found is None:
                self.items.append({"add": {kind: obj}})
            elif kind == "set" and obj.get("elem"):
                self._element("add", {"name": name, "elem": obj["elem"]})
            return
        if found is None:
            raise Refused(f"{NOENT}: {kind} {name}")
        if verb == "flush" and kind == "chain":
            self.drop(lambda o: "rule" not in o or o["rule"].get("chain") != name)
        elif verb == "flush" and kind == "set":
            found["elem"] = []
        elif verb == "delete":
            if kind == "chain" and (self.rules(name) or self.referenced("chain", name)):
                raise Refused(f"{BUSY}: chain {name}")
            if kind == "set" and self.referenced("set", name):
                raise Refused(f"{BUSY}: set {name}")
            self.drop(lambda o: o.get(kind) is not found)
        else:
            raise Refused(f"the fake kernel does not interpret {verb} {kind}")


class FakeKernel:
    """One egressd table per place (a namespace path, or an interface name for the host side), held as the
    commands that would create it, in creation order. `transactions` records what was run, accepted or not."""

    def __init__(self) -> None:
        self.tables: dict[str, list[Json]] = {}
        self.transactions: list[tuple[str, list[Json]]] = []

    def run(self, where: str, commands: list[Json]) -> None:
        """Every command, or none: ApplyError (with the kernel's words) when one is refused."""
        commands = json.loads(json.dumps(commands))  # nothing of the caller's objects is kept
        self.transactions.append((where, commands))
        items: list[Json] | None = copy.deepcopy(self.tables.get(where))
        try:
            for cmd in commands:
                items = self._command(items, cmd)
        except Refused as e:
            raise ApplyError(f"Error: Could not process rule: {e}") from None
        if items is None:
            self.tables.pop(where, None)
        else:
            self.tables[where] = items

    def _command(self, items: list[Json] | None, cmd: Json) -> list[Json] | None:
        ((verb, body),) = cmd.items()
        ((kind, obj),) = body.items()
        if kind == "table":
            if verb in ("add", "create"):
                if items is not None and verb == "create":
                    raise Refused(f"{EXIST}: table {obj.get('name')}")
                return items if items is not None else [{"add": {"table": obj}}]
            if items is None:
                raise Refused(f"{NOENT}: table {obj.get('name')}")
            if verb == "delete":
                return None
            raise Refused(f"the fake kernel does not interpret {verb} table")
        if items is None:
            raise Refused(f"{NOENT}: table {obj.get('table')}")
        table = _Table(items)
        table.command(verb, kind, obj)
        return table.items

    def listing(self, where: str) -> list[Json] | None:
        """As libnftables lists a table: the table, its chains, sets and counters, then the rules chain by
        chain."""
        items = self.tables.get(where)
        if items is None:
            return None
        objects = [copy.deepcopy(i["add"]) for i in items if "rule" not in i["add"]]
        chains = [o["chain"]["name"] for o in objects if "chain" in o]
        rules = [copy.deepcopy(i["add"]) for i in items if "rule" in i["add"]]
        order = {name: n for n, name in enumerate(chains)}
        rules.sort(key=lambda r: order.get(r["rule"].get("chain"), len(order)))
        for o in objects:
            if "set" in o and not o["set"].get("elem"):
                o["set"].pop("elem", None)  # libnftables lists an empty set without elements
        return objects + rules

    def dns_elements(self, where: str) -> dict[str, set[str]]:
        """The DNS sets of the variant in force, by neutral name."""
        listing = self.listing(where) or []
        variant = active_variant(listing) or "a"
        out: dict[str, set[str]] = {}
        for item in listing:
            name = str(item.get("set", {}).get("name", ""))
            if (
                name
                and neutral_name(name).endswith(DNS_SET_SUFFIXES)
                and name == variant_name(neutral_name(name), variant)
            ):
                out[neutral_name(name)] = {str(e) for e in item["set"].get("elem", ())}
        return out


@dataclass
class FakeBackend:
    """The Backend interface over a FakeKernel, with a record of every write; `fail` injects errors per
    namespace and operation ("apply", "update", "read", "counter", "remove"). host_side: it stands in for
    HostBackend, keyed by interface name, writing and listing host-side tables."""

    namespaces: set[str] = field(default_factory=set)
    kernel: FakeKernel = field(default_factory=FakeKernel)
    writes: list[tuple[str, str]] = field(default_factory=list)
    fail: Callable[[str, str], Exception | None] | None = None
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # netns -> denied (packets, bytes)
    reads: int = 0  # whole-table reads (fingerprint reads are not counted)
    host_side: bool = False

    def __post_init__(self) -> None:
        self._writer = TableWriter(self, target_for=target_for) if self.host_side else TableWriter(self)

    @property
    def tables(self) -> dict[str, list[Json]]:
        """The kernel's tables, by place: tests change them to play someone tampering."""
        return self.kernel.tables

    @property
    def elements(self) -> dict[str, dict[str, set[str]]]:
        return {where: self.kernel.dns_elements(where) for where in self.kernel.tables}

    def _check(self, netns: str, op: str) -> None:
        if netns not in self.namespaces:
            raise NetnsError(netns, "does not exist (yet); waiting for it to appear", gone=True)
        if self.fail is not None:
            exc = self.fail(netns, op)
            if exc is not None:
                raise exc

    def run(self, netns: str, commands: list[Json], what: str) -> None:
        """The TableWriter's Runner: one transaction on the fake kernel."""
        try:
            self.kernel.run(netns, commands)
        except ApplyError as e:
            raise ApplyError(f"nftables refused the {what} for {netns}: {e}") from None

    def apply(
        self,
        netns: str,
        ruleset: Ruleset,
        elements: Elements | None = None,
        listing: list[Json] | None = None,
    ) -> None:
        self._check(netns, "apply")
        self._writer.apply(netns, ruleset, elements, listing)
        self.writes.append(("apply", netns))

    def update_elements(self, netns: str, add: Elements, delete: Elements, variant: str = "a") -> None:
        self._check(netns, "update")
        self._writer.update_elements(netns, add, delete, variant)
        self.writes.append(("update", netns))

    def learn(self, netns: str, timeouts: dict[str, int], replace: bool = False) -> None:
        self._check(netns, "learn")
        self.run(netns, learn_commands(timeouts, replace=replace), "learned addresses")
        self.writes.append(("learn", netns))

    def read_learned(self, netns: str) -> dict[str, int]:
        self._check(netns, "read")
        return learned_elements(self.kernel.listing(netns) or [])

    def read(self, netns: str) -> list[Json] | None:
        self.reads += 1
        self._check(netns, "read")
        listing = self.kernel.listing(netns)
        return neutral_listing(listing) if listing is not None and self.host_side else listing

    def read_marked(self, netns: str) -> tuple[list[Json] | None, int | None]:
        return self.read(netns), None  # no generation: a change monitor (real kernels only) checks anyway

    def set_elements(self, netns: str, names: Iterable[str]) -> dict[str, frozenset[str]] | None:
        self._check(netns, "read")
        wanted = set(names)
        out: dict[str, frozenset[str]] = {}
        for item in self.kernel.listing(netns) or []:
            obj = item.get("set")
            if obj and obj.get("name") in wanted:
                out[obj["name"]] = frozenset(e for e in obj.get("elem", ()) if isinstance(e, str))
        return out

    def fingerprint(self, netns: str) -> str | None:
        self._check(netns, "read")
        listing = self.kernel.listing(netns)
        return None if listing is None else fingerprint_of(listing)

    def counter(self, netns: str, name: str = "denied") -> tuple[int, int] | None:
        self._check(netns, "counter")
        if netns not in self.tables or name != "denied":
            return None
        return self.counters.get(netns, (0, 0))

    def remove(self, netns: str) -> bool:
        self._check(netns, "remove")
        self.writes.append(("remove", netns))
        return self.kernel.tables.pop(netns, None) is not None

    def forget(self, netns: str) -> None:
        self._writer.forget(netns)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """As HostBackend.prune: drop every table not kept (the fake stands in for the host side too)."""
        gone = sorted(set(self.tables) - set(keep))
        for where in gone:
            self.remove(where)
        return gone
