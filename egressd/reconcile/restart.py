"""What a restart needs, as the state file's document: desired state, tombstones, how the kernel lists each
shape of table, the fingerprints in force (so a restarted agent adopts its tables with zero writes) and the
DNS cache (so it enforces the same addresses at once)."""

from __future__ import annotations

from typing import Any

from egressd.desired.statefile import Encoded, compact
from egressd.desired.store import Desired
from egressd.model.sandbox import PolicyError, Sandbox, parse_sandbox, sandbox_to_record
from egressd.reconcile.reconciler import Reconciler
from egressd.reconcile.sync import LISTING_FORM


def export_state(r: Reconciler) -> tuple[dict[str, Any], int]:
    """What must survive a restart (desired state, tombstones, the digests used to adopt tables, the DNS
    cache), and the desired generation it includes. Records are serialised once per generation."""
    sandboxes, texts = [], []
    for d in r.desired.values():
        if d.record is None:
            sb = Sandbox(id=d.id, netns=d.netns, policy=d.policy, status=d.status, revision=d.revision,
                         host_interface=d.host_interface)  # fmt: skip
            d.record = {"record": sandbox_to_record(sb), "problem": d.problem}
            d.record_json = compact(d.record)
        sandboxes.append(d.record)
        texts.append(d.record_json)
    r.disk.exporting(frozenset(r.desired))
    in_force = {}
    for sid, st in r.status.items():
        d = r.desired.get(sid)
        shape = r.sync.shapes.get(st.fingerprint or "")
        if (
            d is not None
            and shape is not None
            and st.fingerprint is not None
            and st.generation == d.generation
        ):
            in_force[sid] = [st.fingerprint, shape]
    doc = {
        "sandboxes": Encoded(sandboxes, texts),
        "tombstones": [[sid, rev] for sid, rev in r.tombstones.items()],
        "digests": dict(r.sync.digests),
        "digest_form": LISTING_FORM,
        "dns": r.dns.cache.export() if r.dns is not None else {},
        "in_force": {"key": r.sync.adoption_key(), "tables": in_force},
    }
    return doc, r.store.generation


def restore_state(r: Reconciler, doc: dict[str, Any]) -> list[str]:
    """Load what export_state wrote; returns problems with entries that could not be restored."""
    problems = []
    for i, item in enumerate(doc.get("sandboxes", [])):
        try:
            sb = parse_sandbox(item["record"], max_entries=1_000_000)
        except (PolicyError, KeyError, TypeError) as e:
            problems.append(f"state sandboxes[{i}]: {e}")
            continue
        problem = item.get("problem")
        d = Desired(
            sb.id, sb.netns, sb.revision, sb.policy, sb.status, problem if isinstance(problem, str) else None,
            host_interface=sb.host_interface,
        )  # fmt: skip
        r.store.put(d)
    in_force = doc.get("in_force")
    if isinstance(in_force, dict) and in_force.get("key") == r.sync.adoption_key():
        tables = in_force.get("tables")
        for sid, pair in tables.items() if isinstance(tables, dict) else ():
            d = r.desired.get(sid)
            if (
                d is not None
                and isinstance(pair, list)
                and len(pair) == 2
                and all(isinstance(x, str) for x in pair)
            ):
                r.sync.hints[sid] = (d.generation, pair[0], pair[1])
    for entry in doc.get("tombstones", []):
        if isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str):
            r.tombstones[entry[0]] = entry[1] if isinstance(entry[1], int) else None
    digests = doc.get("digests", {})
    if isinstance(digests, dict) and doc.get("digest_form") == LISTING_FORM:  # else: learned again
        r.sync.digests.update({k: v for k, v in digests.items() if isinstance(k, str) and isinstance(v, str)})
    if r.dns is not None:
        r.dns.cache.restore(doc.get("dns"))
    r.disk.read(frozenset(r.desired) | _ids_in(doc))
    return problems


def _ids_in(doc: dict[str, Any]) -> frozenset[str]:
    """Every sandbox id the file names, restored or not (a record this agent could not read may be read by
    the next): each one's first table waits for a write, as a known sandbox's does."""
    ids = set()
    for item in doc.get("sandboxes", []):
        record = item.get("record") if isinstance(item, dict) else None
        sid = record.get("id") if isinstance(record, dict) else None
        if isinstance(sid, str):
            ids.add(sid)
    return frozenset(ids)
