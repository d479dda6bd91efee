"""The host-side table: the same decision again, where the sandbox's packets arrive on the host.

A process with CAP_NET_RAW in the sandbox's namespace can send through a packet socket, below the hooks
of the sandbox's own table; one with CAP_NET_ADMIN there can delete that table. Neither reaches the
namespace egressd runs in. For a sandbox whose record names `host_interface` (the host end of its veth or
tap), one shared table `inet egressd_host` in egressd's own namespace judges every packet that enters from
that interface, after conntrack (so replies on connections opened from outside still pass) and before
destination NAT (so the address the sandbox asked for is the one judged).

Shape: one prerouting chain, `iifname vmap @dispatch`, jumps to the sandbox's entry chain (named by its
key, a hash of its id), whose one rule jumps to the group in force: `<key>_<tag><digit>_decide`, with the
tag from the policy's fingerprint and its DNS addresses. A hash lookup per packet, whatever the number of
sandboxes. An update stages a new group beside the one in force, then rewrites the entry chain's rule and
deletes the old group: two transactions, so a set is never new in the transaction whose rules read it
(see render.Ruleset).

Cost, measured on libnftables 1.0.6: any `add element` or `delete element` command makes it load the whole
ruleset with every set's elements first (about 100 ms per transaction with 200 sandboxes here), while
elements given in a set or map declaration cost nothing extra. So elements always come inside
declarations, a DNS change stages a new group instead of editing sets, each interface's dispatch element is
written once, and elements of removed sandboxes are deleted later, many in one transaction (`collect`).

The table is mirrored in memory and read whole (one call) only when the mirror is unknown: at start, after
`invalidate` (each resync), or after a failed write.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from egressd.render import FAMILY, TABLE, Json, Ruleset

HOST_TABLE = "egressd_host"
DISPATCH = "dispatch"
HOOK_CHAIN = "prerouting"
# After conntrack (-200): replies are told apart. Before destination NAT (-100): the sandbox's own
# destination is judged, not one a port forward rewrote it to.
PRIORITY = -150
_T = {"family": FAMILY, "table": HOST_TABLE}
_KEY = re.compile(r"^s[0-9a-f]{12}$")
_GROUP = re.compile(r"^(s[0-9a-f]{12})_([0-9a-f]{10})([0-9])_(.+)$")


class HostTableError(Exception):
    """nftables refused a host-side transaction; nothing of it is in force."""


class HostNft(Protocol):
    """What HostSide needs from a backend: transactions and listings in egressd's own namespace."""

    def host_run(self, cmds: list[Json], what: str) -> None:
        """One transaction; raises HostTableError."""

    def host_list(self, what: Json) -> list[Json] | None:
        """A listing, or None when the object does not exist."""


def sandbox_key(sid: str) -> str:
    """A fixed-size, name-safe key for a sandbox id (ids may hold characters chain names should not)."""
    return "s" + hashlib.sha256(sid.encode()).hexdigest()[:12]


def policy_tag(fingerprint: str, elements: Mapping[str, Iterable[str]] | None = None) -> str:
    """Which group a policy with these DNS addresses is: a change of either is a new group."""
    canonical = json.dumps([fingerprint, {k: sorted(v) for k, v in sorted((elements or {}).items())}])
    return hashlib.sha256(canonical.encode()).hexdigest()[:10]


def base_commands(with_rule: bool = True) -> list[Json]:
    """The shared table, its dispatch map and the one hook. `add` of an existing table, map or chain is a
    no-op, so this also mends a table someone emptied; the rule is added only when it is missing."""
    cmds = [
        {"add": {"table": {"family": FAMILY, "name": HOST_TABLE}}},
        {"add": {"map": {**_T, "name": DISPATCH, "type": "ifname", "map": "verdict"}}},
        {
            "add": {
                "chain": {
                    **_T,
                    "name": HOOK_CHAIN,
                    "type": "filter",
                    "hook": "prerouting",
                    "prio": PRIORITY,
                    "policy": "accept",
                }
            }
        },
        {
            "add": {
                "rule": {
                    **_T,
                    "chain": HOOK_CHAIN,
                    "expr": [{"vmap": {"key": {"meta": {"key": "iifname"}}, "data": f"@{DISPATCH}"}}],
                }
            }
        },
    ]
    return cmds if with_rule else cmds[:-1]


def _retarget(obj: Any, group: str, names: frozenset[str]) -> Any:
    """Ruleset commands with the table set to egressd_host and every per-policy object put in group."""
    if isinstance(obj, list):
        return [_retarget(o, group, names) for o in obj]
    if not isinstance(obj, dict):
        if isinstance(obj, str) and obj.startswith("@") and obj[1:] in names:
            return f"@{group}_{obj[1:]}"
        return obj
    out = {}
    for key, value in obj.items():
        if key == "table" and value == TABLE:
            out[key] = HOST_TABLE
        elif key in ("name", "chain", "target") and isinstance(value, str) and value in names:
            out[key] = f"{group}_{value}"
        else:
            out[key] = _retarget(value, group, names)
    return out


def stage_commands(ruleset: Ruleset, group: str, elements: Mapping[str, Iterable[str]]) -> list[Json]:
    """The group's sets, chains and rules. `create` fails on a name already there, so nothing left over or
    planted can mix in; the elements follow in an `add` of the same declaration (see the module doc)."""
    sets: list[Json] = []
    fill: list[Json] = []
    rest: list[Json] = []
    for cmd in _retarget(ruleset.variant, group, ruleset.names):
        obj = cmd["add"]
        if "set" in obj:
            decl = {k: v for k, v in obj["set"].items() if k != "elem"}
            sets.append({"create": {"set": decl}})
            elem = list(obj["set"].get("elem", ()))
            elem += sorted(elements.get(decl["name"][len(group) + 1 :], ()))
            if elem:
                fill.append({"add": {"set": {**decl, "elem": elem}}})
        elif "chain" in obj:
            rest.append({"create": obj})
        else:
            rest.append(cmd)
    return [*sets, *fill, *rest]


def retire_commands(group: Group) -> list[Json]:
    chains = sorted(group.chains, key=lambda n: not n.endswith("_decide"))  # decide jumps to deny
    out: list[Json] = []
    for name in chains:
        out.append({"flush": {"chain": {**_T, "name": name}}})
        out.append({"delete": {"chain": {**_T, "name": name}}})
    out += [{"delete": {"set": {**_T, "name": n}}} for n in sorted(group.sets)]
    return out


def _entry_commands(key: str, group: str) -> list[Json]:
    return [
        {"flush": {"chain": {**_T, "name": key}}},
        {"add": {"rule": {**_T, "chain": key, "expr": [{"jump": {"target": f"{group}_decide"}}]}}},
    ]


def _wire(iface: str, key: str) -> Json:
    """The dispatch element, inside a map declaration: no cache load (see the module doc)."""
    elem = [[iface, {"jump": {"target": key}}]]
    return {"add": {"map": {**_T, "name": DISPATCH, "type": "ifname", "map": "verdict", "elem": elem}}}


def _unwire(ifaces: Iterable[str]) -> list[Json]:
    return [{"delete": {"element": {**_T, "name": DISPATCH, "elem": sorted(ifaces)}}}] if ifaces else []


@dataclass
class Group:
    """One sandbox's objects for one policy, as found in (or written to) the kernel."""

    name: str  # <key>_<tag><digit>
    chains: set[str] = field(default_factory=set)
    sets: set[str] = field(default_factory=set)
    digest: str | None = None  # of its listing, names made neutral; None when written but not read back

    @property
    def decide(self) -> str:
        return f"{self.name}_decide"


@dataclass
class Mirror:
    """What this process believes the host table holds."""

    base: bool = False  # table, map, hook chain and its rule
    hook_rule: bool = False  # the hook chain's one rule (adding it twice would double every lookup)
    dispatch: dict[str, str] = field(default_factory=dict)  # interface -> the entry chain it jumps to
    entries: dict[str, str | None] = field(default_factory=dict)  # key -> group its entry jumps to
    groups: dict[str, dict[str, Group]] = field(default_factory=dict)  # key -> group name -> group


_HANDLE = re.compile(r'"handle":\s*\d+,?\s*')
_COUNTS = re.compile(r'"(packets|bytes)":\s*\d+')


def _parse(listing: list[Json] | None) -> Mirror:
    mirror = Mirror()
    if listing is None:
        return mirror
    members: dict[str, list[Json]] = {}

    def group_of(name: str) -> Group | None:
        m = _GROUP.match(name)
        if m is None:
            return None
        gname = f"{m.group(1)}_{m.group(2)}{m.group(3)}"
        return mirror.groups.setdefault(m.group(1), {}).setdefault(gname, Group(gname))

    hook_rule = False
    for item in listing:
        if "map" in item and item["map"].get("name") == DISPATCH:
            for iface, verdict in item["map"].get("elem", ()):
                target = verdict.get("jump", {}).get("target") if isinstance(verdict, dict) else None
                if isinstance(iface, str) and isinstance(target, str):
                    mirror.dispatch[iface] = target
        elif "chain" in item and _KEY.match(item["chain"]["name"]):
            mirror.entries.setdefault(item["chain"]["name"], None)
        elif "chain" in item and (g := group_of(item["chain"]["name"])):
            g.chains.add(item["chain"]["name"])
            members.setdefault(g.name, []).append(item)
        elif "set" in item and (g := group_of(item["set"]["name"])):
            g.sets.add(item["set"]["name"])
            members.setdefault(g.name, []).append(item)
        elif "rule" in item:
            chain = item["rule"].get("chain", "")
            if chain == HOOK_CHAIN:
                hook_rule = True
            elif _KEY.match(chain):
                # An entry chain holds one jump; anything else in it and it is not ours to trust.
                jumps = [e["jump"]["target"] for e in item["rule"].get("expr", ()) if "jump" in e]
                ok = len(item["rule"].get("expr", ())) == 1 and jumps and jumps[0].endswith("_decide")
                first = chain not in mirror.entries or mirror.entries[chain] is None
                mirror.entries[chain] = jumps[0][: -len("_decide")] if ok and first else "?"
            elif g := group_of(chain):
                members.setdefault(g.name, []).append(item)
    mirror.hook_rule = hook_rule
    has_map = any("map" in i and i["map"].get("name") == DISPATCH for i in listing)
    has_hook = any("chain" in i and i["chain"].get("name") == HOOK_CHAIN for i in listing)
    mirror.base = hook_rule and has_map and has_hook
    for groups in mirror.groups.values():
        for g in groups.values():
            text = json.dumps(members.get(g.name, []), sort_keys=True, separators=(",", ":"))
            text = _COUNTS.sub(r'"\1":0', _HANDLE.sub("", text)).replace(g.name, "G")
            g.digest = hashlib.sha256(text.encode()).hexdigest()
    return mirror


@dataclass(frozen=True)
class HostResult:
    outcome: str  # "unchanged", "applied", "repaired"
    writes: int
    detail: str | None = None


class HostSide:
    """Keeps each sandbox's group and dispatch element in the shared host table. Thread-safe: one sandbox
    at a time, since every change also touches the shared map."""

    def __init__(self, nft: HostNft) -> None:
        self._nft = nft
        self._lock = threading.Lock()
        self._mirror: Mirror | None = None
        self._digests: dict[str, str] = {}  # policy tag -> digest of a group of it, as first read back
        self._ours: set[str] = set()  # keys this process wrote or adopted

    def invalidate(self) -> None:
        """Read the kernel again before the next change (a resync, or a change event on the host)."""
        with self._lock:
            self._mirror = None

    def _load(self) -> Mirror:
        if self._mirror is None:
            listing = self._nft.host_list({"table": {"family": FAMILY, "name": HOST_TABLE}})
            self._mirror = _parse(listing)
            # What a policy's group should look like is learnt from the kernel: the first time a policy is
            # read, the digest most of its groups share. A group edited in place is then told apart from
            # the others of its policy; one read alone is trusted (host root is not the adversary here).
            votes: dict[str, Counter[str]] = {}
            for groups in self._mirror.groups.values():
                for g in groups.values():
                    if g.digest is not None:
                        votes.setdefault(g.name.split("_", 1)[1][:-1], Counter())[g.digest] += 1
            for tag, counts in votes.items():
                if tag not in self._digests:
                    self._digests[tag] = counts.most_common(1)[0][0]
        return self._mirror

    def _run(self, cmds: list[Json], what: str) -> None:
        try:
            self._nft.host_run(cmds, what)
        except HostTableError:
            self._mirror = None  # the kernel disagrees with the mirror: read it before trying again
            raise

    def sync(
        self, sid: str, iface: str, ruleset: Ruleset, elements: Mapping[str, frozenset[str]]
    ) -> HostResult:
        """Make iface lead to this policy's group, with these DNS addresses, writing only what differs."""
        with self._lock:
            m = self._load()
            key, tag = sandbox_key(sid), policy_tag(ruleset.fingerprint, elements)
            groups = m.groups.get(key, {})
            entry = m.entries.get(key)
            current = groups.get(entry) if entry else None
            wired = m.dispatch.get(iface) == key
            stray = [i for i, t in m.dispatch.items() if t == key and i != iface]
            same_policy = current is not None and current.name[:-1].endswith(tag)
            known = self._digests.get(tag)
            untouched = current is not None and (current.digest is None or known in (None, current.digest))
            if same_policy and untouched and wired and not stray and len(groups) == 1:
                self._ours.add(key)
                return HostResult("unchanged", 0)
            detail = None
            if key in self._ours and not stray and (current is None or not wired):
                detail = "host-side table, entry chain or dispatch element was removed"
            elif key in self._ours and same_policy and not untouched:
                detail = "host-side chain was altered"
            used = {g.name for g in groups.values()}
            name = next(f"{key}_{tag}{n}" for n in range(10) if f"{key}_{tag}{n}" not in used)
            new = Group(name, {f"{name}_decide", f"{name}_deny"},
                        {f"{name}_{n}" for n in ruleset.names if n not in ("decide", "deny")})  # fmt: skip
            stage = [] if m.base else base_commands(with_rule=not m.hook_rule)
            if key not in m.entries:
                stage.append({"create": {"chain": {**_T, "name": key}}})
            self._run([*stage, *stage_commands(ruleset, name, elements)], "host-side staged policy")
            m.base = m.hook_rule = True
            m.entries.setdefault(key, None)
            # Rare and costly (a whole-ruleset load): the interface led elsewhere, or this sandbox moved.
            switch = _unwire([*stray, *([iface] if iface in m.dispatch and not wired else [])])
            if not wired:
                switch.append(_wire(iface, key))
            switch += _entry_commands(key, name)
            for g in groups.values():
                switch += retire_commands(g)
            self._run(switch, "host-side switch")
            for i in stray:
                m.dispatch.pop(i, None)
            m.dispatch[iface] = key
            m.entries[key] = name
            m.groups[key] = {name: new}
            self._ours.add(key)
            return HostResult("repaired" if detail else "applied", 2, detail)

    def remove(self, sid: str) -> bool:
        """Take a sandbox's groups out and empty its entry chain; False when it had none. Its dispatch
        elements and entry chain stay, leading nowhere, until `collect` deletes them in bulk."""
        with self._lock:
            m = self._load()
            key = sandbox_key(sid)
            groups = m.groups.get(key, {})
            if not groups and m.entries.get(key) is None:
                return False
            cmds: list[Json] = [{"flush": {"chain": {**_T, "name": key}}}] if key in m.entries else []
            for g in groups.values():
                cmds += retire_commands(g)
            self._run(cmds, "host-side removal")
            m.groups.pop(key, None)
            if key in m.entries:
                m.entries[key] = None
            self._ours.discard(key)
            return True

    def collect(self) -> int:
        """Delete, in one transaction, the dispatch elements and entry chains that lead nowhere; returns how
        many entry chains went."""
        with self._lock:
            m = self._load()
            idle = [k for k, g in m.entries.items() if g is None and not m.groups.get(k)]
            if not idle:
                return 0
            gone = set(idle)
            ifaces = [i for i, t in m.dispatch.items() if t in gone]
            cmds = _unwire(ifaces) + [{"delete": {"chain": {**_T, "name": k}}} for k in idle]
            self._run(cmds, "host-side cleanup")
            for i in ifaces:
                del m.dispatch[i]
            for k in idle:
                del m.entries[k]
            return len(idle)

    def prune(self, keep: Iterable[str]) -> list[str]:
        """Remove what belongs to sandboxes not in keep (deleted while no agent ran); returns their keys."""
        keys = {sandbox_key(sid) for sid in keep}
        with self._lock:
            self._mirror = None
            m = self._load()
            gone = sorted((set(m.groups) | set(m.entries) | set(m.dispatch.values())) - keys)
            if not gone:
                return []
            ifaces = [i for i, t in m.dispatch.items() if t in gone]
            cmds = _unwire(ifaces)
            cmds += [{"flush": {"chain": {**_T, "name": k}}} for k in gone if k in m.entries]
            for k in gone:
                for g in m.groups.get(k, {}).values():
                    cmds += retire_commands(g)
            cmds += [{"delete": {"chain": {**_T, "name": k}}} for k in gone if k in m.entries]
            self._run(cmds, "host-side prune")
            for i in ifaces:
                del m.dispatch[i]
            for k in gone:
                m.groups.pop(k, None)
                m.entries.pop(k, None)
            return gone
