"""The one table sync: make one table (a sandbox's, or a host-side one) equal to its ruleset, writing only
what differs, and remember what makes the next sync cheap.

The reconciler's workers and `egressd apply` both call TableSync.sync. What it remembers: rendered tables (a
DNS refresh or a resync re-renders nothing), how the kernel lists each shape of table (digests: a table is
compared whole without a read back after every write), which shape each fingerprint in force has, and the
fingerprints the last agent put in force (hints: a restart adopts a table on one short read).
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import re
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

from egressd import __version__
from egressd.desired.dnscache import DnsCache
from egressd.kernel.backend import Backend
from egressd.model.config import Config
from egressd.model.sandbox import DENY_ALL, Policy
from egressd.ruleset.dnsrules import LEARNED_SETS
from egressd.ruleset.exprs import CT_MARK, Json
from egressd.ruleset.plan import plan
from egressd.ruleset.render import FINGERPRINT_CHAIN, VARIANTS, Ruleset, render
from egressd.ruleset.transactions import active_variant, fingerprint_of, set_elements
from egressd.ruleset.variants import neutral_name, variant_name

DNS_SET_SUFFIXES = ("_dns4", "_dns6")
# Rendered tables kept (about 40 KB each as Python objects): enough for the sandboxes whose DNS answers or
# events keep them busy; a resync of thousands re-renders most of them (0.3 ms each) instead of holding all.
RENDER_CACHE = 64


@dataclass(frozen=True)
class SyncResult:
    outcome: str  # "unchanged", "adopted", "applied", "repaired"
    fingerprint: str
    shape: str
    digest: str
    writes: int
    detail: str | None = None
    # The namespace's ruleset generation just before this sync found no table there and wrote one: the
    # change monitor, once it listens, skips its first check if the generation is one higher (nothing but
    # that write was committed). None: no such proof; the monitor checks.
    before: int | None = None


def describe_change(add: dict[str, frozenset[str]], delete: dict[str, frozenset[str]]) -> str:
    parts = [f"+{e} {n}" for n, es in add.items() for e in sorted(es)]
    parts += [f"-{e} {n}" for n, es in delete.items() for e in sorted(es)]
    return " ".join(parts[:20]) + (f" (+{len(parts) - 20} more)" if len(parts) > 20 else "")


# How the digests of listings are taken: a state file's digests of another form are learned again, not
# compared (a comparison would call every table altered). 2: host-side tables listed over raw netlink
# (kernel/nfnl_listing.py), and the generation in the prefix form libnftables lists.
LISTING_FORM = 2
_HANDLE = re.compile(r'"handle":\s*\d+,?\s*')
_COUNTS = re.compile(r'"(packets|bytes)":\s*\d+')
_VARIANT = re.compile(r'_[ab]"')


def listing_digest(listing: list[Json]) -> str:
    """What the kernel holds, minus what changes without anyone editing the table (handles, counter values,
    the variant suffix: the same policy in variant a or b is the same table) and minus what is compared on
    its own (set elements: elements_differ, and DNS sets by difference; the fingerprint comment). What is
    left is the same for every policy of one shape (Ruleset.shape). Text substitutions on the JSON: 5x
    faster than walking it in Python."""
    items = []
    for item in listing:
        obj = item.get("set")
        if obj is not None:
            item = {"set": {k: v for k, v in obj.items() if k != "elem"}}
        rule = item.get("rule")
        if rule is not None and rule.get("chain") == FINGERPRINT_CHAIN and "comment" in rule:
            item = {"rule": {k: v for k, v in rule.items() if k != "comment"}}
        elif rule is not None:
            item = {"rule": without_generation(rule)}
        items.append(item)
    text = json.dumps(items, sort_keys=True, separators=(",", ":"))
    text = _VARIANT.sub('"', _COUNTS.sub(r'"\1":0', _HANDLE.sub("", text)))
    return hashlib.sha256(text.encode()).hexdigest()


def _is_ct_mark(expr: Any) -> bool:
    if expr == CT_MARK:
        return True
    return isinstance(expr, dict) and isinstance(expr.get("&"), list) and expr["&"][:1] == [CT_MARK]


def _generation_at(e: Any) -> tuple[Any, Any] | None:
    """(where the policy's generation sits in expression e, e with it zeroed), or None when e carries none.
    libnftables lists the hooks' check `ct mark & mask == G` as a prefix match `ct mark G/len`, and folds G
    into the mask of the admit chain's `ct mark set ct mark & ~mask | G`: the values go, the shape stays
    (a prefix keeps its length: a shorter one would let other generations through)."""
    match = e.get("match") if isinstance(e, dict) else None
    if match is not None and _is_ct_mark(match.get("left")):
        right = match.get("right")
        prefix = right.get("prefix") if isinstance(right, dict) else None
        if isinstance(prefix, dict):
            return prefix.get("addr"), {"match": {**match, "right": {"prefix": {**prefix, "addr": 0}}}}
        return right, {"match": {**match, "right": 0}}
    mangle = e.get("mangle") if isinstance(e, dict) else None
    if mangle is not None and mangle.get("key") == CT_MARK and isinstance(mangle.get("value"), dict):
        parts = mangle["value"].get("|")
        if isinstance(parts, list) and len(parts) == 2:
            return parts[1], {"mangle": {**mangle, "value": 0}}
    return None


def without_generation(rule: Json) -> Json:
    """A rule with the policy's generation (ruleset/generation.py) zeroed, in whichever form libnftables
    lists it (see _generation_at). A walk of the rule's top-level expressions only: cheaper than finding
    out first whether it has any."""
    exprs = []
    for e in rule.get("expr", ()):
        found = _generation_at(e)
        exprs.append(e if found is None else found[1])
    return {**rule, "expr": exprs}


def generation_differs(listing: list[Json], ruleset: Ruleset) -> str | None:
    """Whether a table's rules carry another generation than the ruleset's (listing_digest leaves it out,
    so that every policy of a shape lists alike)."""
    for item in listing:
        rule = item.get("rule")
        for e in rule.get("expr", ()) if rule is not None else ():
            found = _generation_at(e)
            if found is not None and found[0] != ruleset.generation:
                return f"chain {rule.get('chain')} carries generation {found[0]}, not {ruleset.generation}"
    return None


def elem_key(e: Any) -> str:
    """One set element as text: how libnftables lists it, in the form render writes it."""
    if isinstance(e, str):
        return e
    if isinstance(e, dict):
        prefix = e.get("prefix")
        if isinstance(prefix, dict):
            return f"{prefix.get('addr')}/{prefix.get('len')}"
        span = e.get("range")
        if isinstance(span, list) and len(span) == 2:
            return f"{span[0]}-{span[1]}"
    return json.dumps(e, sort_keys=True)


def _ranges(keys: Iterable[str]) -> list[tuple[int, int, int]] | None:
    """Elements as merged (version, first, last) address ranges; None when one is not an address."""
    spans: list[tuple[int, int, int]] = []
    try:
        for key in keys:
            if "-" in key:
                lo, hi = (ipaddress.ip_address(x) for x in key.split("-", 1))
            else:
                net = ipaddress.ip_network(key, strict=True)
                lo, hi = net.network_address, net.broadcast_address
            spans.append((lo.version, int(lo), int(hi)))
    except ValueError:
        return None
    merged: list[tuple[int, int, int]] = []
    for v, lo_, hi_ in sorted(spans):
        if merged and merged[-1][0] == v and lo_ <= merged[-1][2] + 1:
            merged[-1] = (v, merged[-1][1], max(merged[-1][2], hi_))
        else:
            merged.append((v, lo_, hi_))
    return merged


def elements_differ(listing: list[Json], ruleset: Ruleset) -> str | None:
    """Which address set of the listing holds other elements than the ruleset renders, if one does. The
    text forms are compared first (libnftables lists elements as render writes them); only if they differ
    are both sides compared as address ranges, which no way of printing can fool."""
    want = ruleset.elements()
    for item in listing:
        obj = item.get("set")
        if obj is None:
            continue
        name = neutral_name(str(obj.get("name", "")))
        if name.endswith(DNS_SET_SUFFIXES) or name in LEARNED_SETS:
            continue  # compared by difference (DNS), or filled by the proxy and emptied by time (learned)
        have = sorted(elem_key(e) for e in obj.get("elem", ()))
        expected = sorted(elem_key(e) for e in want.get(name, ()))
        if have != expected and (_ranges(have) is None or _ranges(have) != _ranges(expected)):
            return f"set {name} holds other addresses than the policy's"
    return None


def dns_sets_hold(
    backend: Backend, netns: str, ruleset: Ruleset, elements: dict[str, frozenset[str]]
) -> bool:
    """Whether the DNS sets of the variant in force hold exactly these elements, read set by set (the sets
    of the other variant are gone after every switch); False when that cannot be told this way."""
    names = [variant_name(n, v) for n in ruleset.dns_sets for v in VARIANTS]
    have = backend.set_elements(netns, names)
    for v in VARIANTS if have is not None else ():
        if all(variant_name(n, v) in have for n in ruleset.dns_sets):
            return all(have[variant_name(n, v)] == elements.get(n, frozenset()) for n in ruleset.dns_sets)
    return False


class TableSync:
    """The sync step and its memory. Call render/target/sync from anywhere; update the memory (learned,
    prune, hints) from one thread: workers only read it."""

    def __init__(self, config: Config) -> None:
        self.config = config
        # Ruleset.shape -> listing_digest of its tables, as the kernel lists them
        self.digests: dict[str, str] = {}
        self.shapes: dict[str, str] = {}  # fingerprint -> Ruleset.shape, for the tables in force
        # sandbox id -> (desired generation, fingerprint and shape in force for it), from the state file
        self.hints: dict[str, tuple[int, str, str]] = {}
        self.adopt_by_fingerprint = False  # the daemon sets it for its first pass (see sync)
        # The config for a sandbox whose DNS no proxy answers (one with no namespace: only its host side)
        self._plain = replace(config, intercept=replace(config.intercept, enabled=False))
        self._rendered: OrderedDict[tuple[Policy, int, bool], Ruleset] = OrderedDict()

    def set_config(self, config: Config) -> None:
        """A reloaded config: every table is rendered again."""
        self.config = config
        self._plain = replace(config, intercept=replace(config.intercept, enabled=False))
        self._rendered.clear()

    def render(self, policy: Policy, host: bool = False, intercept: bool = True) -> Ruleset:
        """Rendering is cached: a DNS refresh or a resync re-renders nothing."""
        config = self.config if intercept else self._plain
        key = (policy, id(config), host)
        ruleset = self._rendered.get(key)
        if ruleset is None:
            ruleset = self._rendered[key] = render(policy, config, host)
            if len(self._rendered) > RENDER_CACHE:
                self._rendered.popitem(last=False)
        return ruleset

    def target(
        self, policy: Policy, cache: DnsCache | None, host: bool = False, intercept: bool = True
    ) -> tuple[Ruleset, dict[str, frozenset[str]], str | None]:
        """The table and DNS elements the policy needs now, and why it is held closed, if it is.
        intercept=False: no proxy answers this sandbox's DNS (it has no namespace), whatever the config."""
        config = self.config if intercept else self._plain
        return plan(policy, config, cache, lambda p: self.render(p, host, intercept))

    def adoption_key(self) -> str:
        """What a remembered fingerprint was rendered under: this version of egressd and every config value
        that shapes a table (the guard sets, deny action, uplink: all in the deny-all table's fingerprint).
        Through the render cache: every state write asks for it."""
        return f"{__version__} {self.render(DENY_ALL).fingerprint}"

    def hint_for(self, sid: str, generation: int) -> tuple[str, str] | None:
        """The (fingerprint, shape) the last agent put in force for this very record, if adoption on it alone
        is allowed now; the hint is used once either way."""
        hint = self.hints.pop(sid, None)
        if hint is None or not self.adopt_by_fingerprint or hint[0] != generation:
            return None
        if hint[2] not in self.digests:
            return None
        return hint[1], hint[2]

    def learned(self, result: SyncResult) -> bool:
        """Remember what a sync found; True when the shape's digest is new (the state file should say so)."""
        new_digest = self.digests.get(result.shape) != result.digest
        self.digests[result.shape] = result.digest
        self.shapes[result.fingerprint] = result.shape
        return new_digest

    def prune(self, in_use: set[str | None]) -> None:
        """Forget fingerprints no table has any more, and the digests of shapes no table has: keep the maps
        bounded."""
        for fingerprint in [f for f in self.shapes if f not in in_use]:
            del self.shapes[fingerprint]
        shapes = set(self.shapes.values())
        for shape in [s for s in self.digests if s not in shapes]:
            del self.digests[shape]

    def sync(
        self,
        backend: Backend,
        netns: str,
        ruleset: Ruleset,
        elements: dict[str, frozenset[str]],
        last_fp: str | None,
    ) -> SyncResult:
        """In a worker thread: make the table in netns equal to ruleset, writing only if it differs.

        last_fp is what this agent last wrote or adopted there: a table that differs from it was changed by
        someone else (drift), one that equals it is simply our previous policy.
        """
        # Startup: a table carrying the fingerprint is adopted on it alone (the whole table is compared by the
        # verification pass right after): a restart costs one short read per sandbox, and one per DNS set.
        shape = ruleset.shape
        known = self.digests.get(shape)
        quick = self.adopt_by_fingerprint and known is not None
        if (
            quick
            and backend.fingerprint(netns) == ruleset.fingerprint
            and (not ruleset.dns_sets or dns_sets_hold(backend, netns, ruleset, elements))
        ):
            return SyncResult("adopted", ruleset.fingerprint, shape, known, 0)
        listing, before = backend.read_marked(netns)
        detail = None
        if listing is None:
            if last_fp is not None:
                detail = "table was deleted"
        else:
            found = fingerprint_of(listing)
            if found == ruleset.fingerprint:
                digest = listing_digest(listing)
                detail = "table was altered in place" if known not in (None, digest) else None
                detail = detail or elements_differ(listing, ruleset) or generation_differs(listing, ruleset)
                if detail is None:
                    outcome = "adopted" if known is None else "unchanged"
                    have = set_elements(listing, ruleset.dns_sets)
                    add = {n: e - have.get(n, frozenset()) for n, e in elements.items()}
                    delete = {n: have.get(n, frozenset()) - e for n, e in elements.items()}
                    if not any(add.values()) and not any(delete.values()):
                        return SyncResult(outcome, found, shape, digest, 0)
                    backend.update_elements(netns, add, delete, active_variant(listing) or "a")
                    return SyncResult("dns_updated", found, shape, digest, 1, describe_change(add, delete))
            elif last_fp is not None and found != last_fp:
                detail = "table was replaced"
        backend.apply(netns, ruleset, elements, listing if listing is not None else [])
        if known is None:
            # The first table of this shape: learn from the kernel how it lists it. Every later table of the
            # shape is taken as committed, without a read back (1-1.5 ms each, most of a cold start).
            known = listing_digest(backend.read(netns) or [])
        outcome = "repaired" if detail else "applied"
        return SyncResult(outcome, ruleset.fingerprint, shape, known, 1, detail, before)
