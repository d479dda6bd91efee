"""What each key of the fleet's bucket means, without a server: one key is an upsert, a delete or a refusal,
and a session's first values are one authoritative snapshot.

Pure (no client library, no asyncio), so the meaning of every key is unit-tested on plain `KvEntry` values;
feed.nats turns the watch's items into them and delivers what they mean.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from egressd.feed.lines import DEFAULT_MAX_LINE
from egressd.model.events import Delete, Snapshot, Upsert
from egressd.model.sandbox import DEFAULT_MAX_ENTRIES, PolicyError, Sandbox, parse_sandbox

KV_DEL, KV_PURGE = "DEL", "PURGE"


@dataclass(frozen=True)
class KvEntry:
    """One key as the watch delivers it, without the client library's types (unit tests build these)."""

    key: str
    value: bytes | None
    revision: int
    op: str | None = None  # None for a put, KV_DEL or KV_PURGE

    @property
    def deleted(self) -> bool:
        return self.op in (KV_DEL, KV_PURGE)


Change = Upsert | Delete | PolicyError


def entry_change(
    entry: KvEntry,
    host_id: str,
    max_value: int = DEFAULT_MAX_LINE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Change:
    """What one key of this host means: an upsert, a delete, or a PolicyError naming what is wrong.

    The key names the sandbox: the record's `id` may be left out, and must match when given. The KV
    revision is the record's revision, whatever the value says.
    """
    sid = entry.key[len(host_id) + 1 :]
    if entry.deleted:
        return Delete(sid)
    try:
        parse_sandbox({"id": sid})  # only to learn whether the key's id is a valid sandbox id
    except PolicyError as e:
        return PolicyError([f"key {entry.key!r}: {p}" for p in e.problems])

    def refused(problem: str) -> PolicyError:
        return PolicyError([f"sandbox {sid!r}: {problem}"], sid, None, entry.revision)

    value = entry.value or b""
    if not value.strip():
        return refused("the value is empty; to remove a sandbox, delete its key")
    if len(value) > max_value:
        return refused(f"the value is {len(value)} bytes, more than [feed] max_line_bytes ({max_value})")
    try:
        raw: Any = json.loads(value)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        why = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e) or "too deep"
        return refused(f"the value is not a JSON record: {why}")
    if not isinstance(raw, dict):
        return refused(f"the value must be a JSON object (a sandbox record), not {type(raw).__name__}")
    try:
        change: Change = Upsert(parse_sandbox({**raw, "id": sid, "revision": entry.revision}, max_entries))
    except PolicyError as e:
        change = e
    if "id" in raw and raw["id"] != sid:
        # Refused, but closed where the record says the sandbox lives, like any other bad record.
        netns, iface = (
            (change.sandbox.netns, change.sandbox.host_interface)
            if isinstance(change, Upsert)
            else (change.netns, change.host_interface)
        )
        problem = (
            f"sandbox {sid!r}: the record's id {str(raw['id'])[:80]!r} is not the key's; write it under key"
            f" {host_id}.<its id>, or leave id out"
        )
        return PolicyError([problem], sid, netns, entry.revision, iface)
    return change


def snapshot_of(
    entries: Iterable[KvEntry],
    host_id: str,
    max_value: int = DEFAULT_MAX_LINE,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> tuple[Snapshot, list[tuple[KvEntry, PolicyError]]]:
    """The bucket's current values for this host as one authoritative snapshot, plus the keys that cannot
    name a sandbox at all (reported on their own: they must not stop the snapshot from forgetting others)."""
    latest: dict[str, KvEntry] = {}
    for e in entries:
        latest[e.key] = e  # in revision order: the last one is the current value
    sandboxes: list[Sandbox] = []
    rejected: list[PolicyError] = []
    unnamed: list[tuple[KvEntry, PolicyError]] = []
    for e in latest.values():
        change = entry_change(e, host_id, max_value, max_entries)
        if isinstance(change, Upsert):
            sandboxes.append(change.sandbox)
        elif isinstance(change, PolicyError):
            if change.sandbox_id is None:
                unnamed.append((e, change))
            else:
                problems = [f"key {e.key} (revision {e.revision}): {p}" for p in change.problems]
                rejected.append(
                    PolicyError(
                        problems, change.sandbox_id, change.netns, change.revision, change.host_interface
                    )
                )
    return Snapshot(tuple(sandboxes), tuple(rejected), authoritative=True), unnamed
