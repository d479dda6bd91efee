"""The transactions that put a ruleset in force, planned as values: pure functions of the ruleset and of the
table as the kernel lists it. A backend only runs them and lists (kernel/writer.py runs every plan).

Three plans cover every write:
- replace: no table, or one not in our shape. One transaction: create-if-absent, delete, build, fill the DNS
  sets. All of it or none.
- update: our table is there with variant `active` in force. Stage the new policy in the other variant
  (clearing leftovers there first), then switch the hooks to it and retire `active`. Two transactions:
  between them both variants exist and the old one is used, so the old policy holds until the new one does,
  and no set is new in the transaction whose rules read it.
- elements: add and delete DNS set elements of the variant in force, in one transaction.
"""

from __future__ import annotations

import ipaddress
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, VARIANT_SUFFIXES, VARIANTS, Ruleset
from egressd.ruleset.variants import (
    NETNS,
    Target,
    create_commands,
    neutral_name,
    own_objects,
    stage_commands,
    switch_commands,
    variant_name,
)

Elements = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class Step:
    """One transaction: what it is called in errors, and its commands."""

    what: str
    commands: list[Json]


@dataclass(frozen=True, slots=True)
class Written:
    """What a plan leaves in force once every step ran: the variant the hooks use, and the per-variant
    objects it made, whose retire commands the next update runs without reading the table. The agent keeps
    one per table, so it holds names, not commands (at 1,000 sandboxes the commands as JSON were about a
    third of the agent's dicts)."""

    variant: str
    chains: tuple[str, ...]  # the variant's chain names, in the kernel
    sets: tuple[str, ...]  # and its set names
    target: Target = NETNS

    @property
    def retire(self) -> list[Json]:
        return retire_names(self.chains, self.sets, self.target)


@dataclass(frozen=True)
class Plan:
    steps: tuple[Step, ...]
    written: Written


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
    """The replace plan's one transaction, as a libnftables document."""
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
    """Which variant the hooks of a listed table use, or None when the table is not in our shape."""
    for item in listing or ():
        rule = item.get("rule")
        if rule and rule.get("chain") in ("output", "ingress"):
            for expr in rule.get("expr", ()):
                target = expr.get("jump", {}).get("target", "") if isinstance(expr, dict) else ""
                if target.startswith("decide_") and target[len("decide_") :] in VARIANTS:
                    return target[len("decide_") :]
    return None


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


def retire_commands(listing: list[Json], variant: str, target: Target = NETNS) -> list[Json]:
    """Delete every per-variant object of `variant` found in listing: chains (all emptied first: decide
    jumps to the logging chains, they to deny), then sets."""
    chains = [
        i["chain"]["name"] for i in listing if "chain" in i and i["chain"]["name"].endswith("_" + variant)
    ]
    sets = [i["set"]["name"] for i in listing if "set" in i and i["set"]["name"].endswith("_" + variant)]
    return retire_names(chains, sets, target)


def retire_names(chains: Iterable[str], sets: Iterable[str], target: Target = NETNS) -> list[Json]:
    """Empty every chain, then delete the chains, then the sets (by their names in the kernel)."""
    where = {"family": target.family, "table": target.table}
    out: list[Json] = [{"flush": {"chain": {**where, "name": name}}} for name in chains]
    out += [{"delete": {"chain": {**where, "name": name}}} for name in chains]
    out += [{"delete": {"set": {**where, "name": n}}} for n in sets]
    return out


# What a table can hold besides rules: each is deleted by `delete {kind: {family, table, name}}`.
OBJECT_KINDS = ("chain", "set", "map", "counter", "quota", "limit", "ct helper", "ct timeout",
                "ct expectation", "secmark", "synproxy", "flowtable")  # fmt: skip


def foreign_commands(listing: list[Json], target: Target = NETNS) -> list[Json]:
    """Delete what a listed table holds that egressd never makes there (a chain, set or stateful object
    someone added under a name of their own; per-variant names are retired with their variant). Chains are
    all emptied before any is deleted: one may jump to another, or read a set."""
    ours = own_objects(target)
    where = {"family": target.family, "table": target.table}
    chains: list[str] = []
    rest: list[Json] = []
    for item in listing:
        for kind in OBJECT_KINDS:
            name = item[kind].get("name") if isinstance(item.get(kind), dict) else None
            if not isinstance(name, str) or (kind, name) in ours or name.endswith(VARIANT_SUFFIXES):
                continue
            if kind == "chain":
                chains.append(name)
            else:
                rest.append({"delete": {kind: {**where, "name": name}}})
    flush = [{"flush": {"chain": {**where, "name": n}}} for n in chains]
    return flush + [{"delete": {"chain": {**where, "name": n}}} for n in chains] + rest


def other_variant(variant: str) -> str:
    return VARIANTS[1] if variant == VARIANTS[0] else VARIANTS[0]


def _written(ruleset: Ruleset, variant: str, target: Target) -> Written:
    """The per-variant objects a ruleset creates under `variant`, by their names in the kernel (interned:
    every table of one shape shares them)."""
    chains = tuple(sys.intern(variant_name(n, variant)) for n in sorted(ruleset.chains))
    sets = tuple(sys.intern(variant_name(n, variant)) for n in sorted(ruleset.names - ruleset.chains))
    return Written(variant, chains, sets, target)


def plan_replace(ruleset: Ruleset, elements: Elements | None, target: Target = NETNS) -> Plan:
    step = Step("table", replace_table(ruleset, elements, target)["nftables"])
    return Plan((step,), _written(ruleset, "a", target))


def plan_update(
    ruleset: Ruleset,
    elements: Elements | None,
    active: str,
    clear: list[Json],
    retire: list[Json],
    target: Target = NETNS,
) -> Plan:
    """Stage in the variant not in force (after `clear`, leftovers there), then switch and run `retire`."""
    new = other_variant(active)
    stage = clear + stage_commands(ruleset, new, target) + element_commands("add", elements, new, target)
    steps = (Step("staged policy", stage), Step("switch", switch_commands(ruleset, new, retire, target)))
    return Plan(steps, _written(ruleset, new, target))


def plan_apply(
    ruleset: Ruleset, elements: Elements | None, listing: list[Json] | None, target: Target = NETNS
) -> Plan:
    """The plan for a table as listed (None: there is none): what the kernel holds decides what is
    cleared and retired, and what is not egressd's goes in the switch (a repair leaves nothing planted)."""
    active = active_variant(listing)
    if listing is None or active is None:
        return plan_replace(ruleset, elements, target)
    clear = retire_commands(listing, other_variant(active), target)
    # Every chain emptied before any is deleted: a chain someone added may jump into the retired variant.
    retire = retire_commands(listing, active, target) + foreign_commands(listing, target)
    retire = [c for c in retire if "flush" in c] + [c for c in retire if "flush" not in c]
    return plan_update(ruleset, elements, active, clear, retire, target)


def plan_after(ruleset: Ruleset, elements: Elements | None, written: Written, target: Target = NETNS) -> Plan:
    """The update plan from what the last plan left in force, without a listing."""
    return plan_update(ruleset, elements, written.variant, [], written.retire, target)


def plan_elements(add: Elements, delete: Elements, variant: str, target: Target = NETNS) -> Step | None:
    """One transaction of element changes to the variant in force; None when there is nothing to change."""
    cmds = element_commands("delete", delete, variant, target) + element_commands("add", add, variant, target)
    return Step("set update", cmds) if cmds else None


def learn_commands(timeouts: Mapping[str, int], target: Target = NETNS, replace: bool = False) -> list[Json]:
    """Addresses from a sandbox's DNS answers into its learned sets, each for `timeouts[address]` seconds.
    Add, delete, add, in one transaction: the one way that sets the timeout of an element that is already
    there on every kernel (a re-add alone does nothing before 6.12). replace: the sets hold only these
    afterwards (a policy that allows other names)."""
    where = {"family": target.family, "table": target.table}
    out: list[Json] = [{"flush": {"set": {**where, "name": n}}} for n in LEARNED_SETS] if replace else []
    for version, name in zip((4, 6), LEARNED_SETS, strict=True):
        addrs = sorted(a for a in timeouts if (":" in a) == (version == 6))
        if not addrs:
            continue
        timed = [{"elem": {"val": a, "timeout": int(timeouts[a])}} for a in addrs]
        out.append({"add": {"element": {**where, "name": name, "elem": timed}}})
        out.append({"delete": {"element": {**where, "name": name, "elem": addrs}}})
        out.append({"add": {"element": {**where, "name": name, "elem": timed}}})
    return out


def learned_elements(listing: list[Json]) -> dict[str, int]:
    """Address -> seconds left, of the learned sets in a listing (libnftables lists `expires`; a fake or an
    element without it, its `timeout`)."""
    out: dict[str, int] = {}
    for item in listing:
        obj = item.get("set")
        if not obj or obj.get("name") not in LEARNED_SETS:
            continue
        for e in obj.get("elem", ()):
            inner = e.get("elem") if isinstance(e, dict) else None
            if isinstance(inner, dict) and isinstance(inner.get("val"), str):
                out[inner["val"]] = int(inner.get("expires", inner.get("timeout", 0)))
    return out
