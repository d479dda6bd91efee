"""Where a rendered table goes, and the commands that build its per-policy objects under one variant name.

A Ruleset names its objects neutrally (decide, allow4). In the kernel each exists as decide_a or decide_b, so
a new policy can be staged beside the one in force and switched to in a second transaction (see
transactions.py). The same commands serve the sandbox's own table and its host-side table: a Target says
which table, in which family, with which base chains.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from egressd.ruleset.dnsrules import INTERCEPT_BASE, LEARNED_SETS
from egressd.ruleset.exprs import FAMILY, TABLE, Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, VARIANT_SUFFIXES, Ruleset

_T = {"family": FAMILY, "table": TABLE}


def _fingerprint_rule(fingerprint: str) -> Json:
    return {
        "add": {
            "rule": {**_T, "chain": FINGERPRINT_CHAIN, "expr": [{"return": None}], "comment": fingerprint}
        }
    }


@dataclass(frozen=True)
class Target:
    """Where a ruleset goes: the sandbox's own `inet egressd`, or its host-side `netdev` table (hostside.py),
    which has one base chain, at the ingress hook of the sandbox's interface."""

    family: str = FAMILY
    table: str = TABLE
    base: tuple[Json, ...] = (
        {"name": "output", "type": "filter", "hook": "output", "prio": 0, "policy": "accept"},
        {"name": "forward", "type": "filter", "hook": "forward", "prio": 0, "policy": "accept"},
        *INTERCEPT_BASE,
    )
    learned: bool = True  # the table has the learned sets DNS interception fills


def _table_objects(target: Target) -> list[Json]:
    """What every table of a target has whatever the policy: made with the table, kept across updates."""
    objects: list[Json] = [
        {"counter": {**_T, "name": "denied"}},
        {"chain": {**_T, "name": FINGERPRINT_CHAIN}},
    ]
    objects += [{"chain": {**_T, **base}} for base in target.base]
    if target.learned:
        for name, kind in zip(LEARNED_SETS, ("ipv4_addr", "ipv6_addr"), strict=True):
            objects.append({"set": {**_T, "name": name, "type": kind, "flags": ["timeout"]}})
    return objects


NETNS = Target()


def own_objects(target: Target) -> set[tuple[str, str]]:
    """(kind, name) of what every table of target has whatever the policy; with the per-variant objects
    (name_a, name_b) that is everything egressd puts in a table."""
    return {(kind, body["name"]) for obj in _table_objects(target) for kind, body in obj.items()}


def retarget(cmds: Any, target: Target) -> Any:
    """Commands written for the sandbox's own table, aimed at target instead."""
    if target == NETNS:
        return cmds
    if isinstance(cmds, list):
        return [retarget(c, target) for c in cmds]
    if not isinstance(cmds, dict):
        return cmds
    out = {}
    for key, value in cmds.items():
        if key == "family" and value == FAMILY:
            out[key] = target.family
        elif key == "table" and value == TABLE:
            out[key] = target.table
        elif key == "table" and isinstance(value, dict) and value.get("name") == TABLE:
            out[key] = {**value, "family": target.family, "name": target.table}
        elif key == "elem":
            out[key] = value  # addresses only: shared, not walked
        else:
            out[key] = retarget(value, target)
    return out


def variant_name(name: str, variant: str) -> str:
    return f"{name}_{variant}"


def neutral_name(name: str) -> str:
    """decide_a -> decide, allow4_b -> allow4: the name a variant object has in the Ruleset."""
    return name[:-2] if name.endswith(VARIANT_SUFFIXES) else name


def _rename(obj: Any, variant: str, names: frozenset[str]) -> Any:
    """The same commands, with every set and chain that exists per variant given its variant name."""
    if isinstance(obj, list):
        return [_rename(o, variant, names) for o in obj]
    if not isinstance(obj, dict):
        if isinstance(obj, str) and obj.startswith("@") and obj[1:] in names:
            return "@" + variant_name(obj[1:], variant)
        return obj
    out = {}
    for key, value in obj.items():
        if key in ("name", "chain", "target") and isinstance(value, str) and value in names:
            out[key] = variant_name(value, variant)
        elif key == "elem":
            out[key] = value  # set elements are addresses, never names: shared, not walked (10,000 of them)
        else:
            out[key] = _rename(value, variant, names)
    return out


class _ExprMemo:
    """Rule expressions already renamed, by their text: most of a table's rules are the same in every table
    (the link rules, the logging chains, the set lookups), and walking them was half of the Python a new
    table cost. Bounded like the encoder's rule cache; the renamed lists are shared, so nothing may change
    them (nothing does: they are only encoded or handed to libnftables as JSON)."""

    LIMIT = 512  # the common rules are a few dozen; a table's own (its generation's marks) fill the rest

    def __init__(self) -> None:
        self._done: dict[tuple[str, str, frozenset[str]], Any] = {}

    def get(self, expr: Any, variant: str, names: frozenset[str]) -> Any:
        key = (repr(expr), variant, names)
        done = self._done.get(key)
        if done is None:
            if len(self._done) >= self.LIMIT:
                self._done.clear()
            done = self._done[key] = _rename(expr, variant, names)
        return done


_EXPRS = _ExprMemo()


def _rename_commands(cmds: list[Json], variant: str, names: frozenset[str]) -> list[Json]:
    """_rename for the shapes render makes ({"add": {"set"|"chain"|"rule": ...}}): a set or chain only
    needs its name changed and a rule its chain and expressions, so the rest (a set's elements above all)
    is shared, not walked. A third of a warm update's Python time went into the general walk."""
    out: list[Json] = []
    for cmd in cmds:
        add = cmd.get("add")
        obj = add if isinstance(add, dict) and len(add) == 1 else None
        kind, body = next(iter(obj.items())) if obj else (None, None)
        if kind in ("set", "chain") and isinstance(body, dict):
            name = body.get("name")
            renamed = variant_name(name, variant) if name in names else name
            out.append({"add": {kind: {**body, "name": renamed}}})
        elif kind == "rule" and isinstance(body, dict):
            chain = body.get("chain")
            rule = {**body, "expr": _EXPRS.get(body.get("expr", []), variant, names)}
            if chain in names:
                rule["chain"] = variant_name(chain, variant)
            out.append({"add": {"rule": rule}})
        else:
            out.append(_rename(cmd, variant, names))
    return out


def create_commands(ruleset: Ruleset, variant: str = "a", target: Target = NETNS) -> list[Json]:
    """The whole table, from nothing, with its per-variant objects named for `variant`."""
    return retarget(
        [
            {"add": {"table": {"family": FAMILY, "name": TABLE}}},
            *[{"add": obj} for obj in _table_objects(target)],
            *_rename_commands(ruleset.variant, variant, ruleset.names),
            *_rename_commands(ruleset.hooks, variant, ruleset.names),
            _fingerprint_rule(ruleset.fingerprint),
        ],
        target,
    )


def stage_commands(ruleset: Ruleset, variant: str, target: Target = NETNS) -> list[Json]:
    """The per-variant objects of a new policy, beside the ones in force and not yet used. Sets and chains
    are created with `create`, which fails when one is already there: nothing left over or planted under
    that name can mix into the new policy (the caller then retires what the kernel holds, and tries again).
    What every table has is added first (`add` does nothing to what is there): a table an older egressd
    wrote gains it."""
    sets: list[Json] = [{"add": obj} for obj in _table_objects(target)]
    elements: list[Json] = []
    rest: list[Json] = []
    for cmd in _rename_commands(ruleset.variant, variant, ruleset.names):
        obj = cmd["add"]
        if "set" in obj:
            decl = {k: v for k, v in obj["set"].items() if k != "elem"}
            sets.append({"create": {"set": decl}})  # `create` takes no elements along: they follow
            if obj["set"].get("elem"):
                elements.append(
                    {"add": {"element": {**_T, "name": decl["name"], "elem": obj["set"]["elem"]}}}
                )
        elif "chain" in obj:
            rest.append({"create": obj})
        else:
            rest.append(cmd)
    return retarget([*sets, *elements, *rest], target)


def switch_commands(ruleset: Ruleset, variant: str, retire: list[Json], target: Target = NETNS) -> list[Json]:
    """Point the hooks at the staged objects and retire the old ones, in one transaction: the staged sets
    were committed before, so no set is new when the rules that read them take effect."""
    names = [base["name"] for base in target.base] + [FINGERPRINT_CHAIN]
    flush = [{"flush": {"chain": {**_T, "name": n}}} for n in names]
    switch = [
        *flush,
        *_rename_commands(ruleset.hooks, variant, ruleset.names),
        _fingerprint_rule(ruleset.fingerprint),
    ]
    return [*retarget(switch, target), *retire]
