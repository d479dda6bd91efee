"""Feed events: one feed line, JSON, into an Upsert, a Delete or a Snapshot of sandbox records.

The envelope around the records (the event type, a snapshot's list, ids listed twice) is kept apart from what
one record holds (model/sandbox.py). Any input gives an event or a PolicyError, nothing else.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from egressd.model.sandbox import DEFAULT_MAX_ENTRIES, SANDBOX_ID_RE, PolicyError, Sandbox, parse_sandbox


@dataclass(frozen=True)
class Upsert:
    sandbox: Sandbox


@dataclass(frozen=True)
class Delete:
    id: str


@dataclass(frozen=True)
class Snapshot:
    """The whole desired state. `rejected` holds the records that failed validation, each with what could
    still be read of its identity: the agent must not forget a sandbox just because its record is broken."""

    sandboxes: tuple[Sandbox, ...]
    rejected: tuple[PolicyError, ...] = ()
    # The source guarantees these are the latest records (a NATS bucket's current values): taken whatever
    # revision the agent knew, so that a bucket made anew, with revisions from 1 again, is not "stale".
    authoritative: bool = False


Event = Upsert | Delete | Snapshot


def parse_line(text: str, max_entries: int = DEFAULT_MAX_ENTRIES) -> Event:
    """One feed line: JSON, then an event. Any input gives an event or a PolicyError, nothing else."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise PolicyError([f"not valid JSON: {e.msg} at column {e.colno}"]) from None
    except RecursionError:
        raise PolicyError(["JSON nested too deeply"]) from None
    except ValueError as e:  # e.g. an integer longer than Python will convert
        raise PolicyError([f"not usable JSON: {e}"]) from None
    return parse_event(raw, max_entries)


def parse_event(raw: Any, max_entries: int = DEFAULT_MAX_ENTRIES) -> Event:
    """Validate one feed event (upsert, delete or snapshot); raises PolicyError naming what is wrong."""
    if not isinstance(raw, dict):
        raise PolicyError([f"an event must be a JSON object, not {type(raw).__name__}"])
    kind = raw.get("type")
    if kind == "upsert":
        if "sandbox" not in raw:
            raise PolicyError(['upsert event has no "sandbox" record'])
        return Upsert(parse_sandbox(raw["sandbox"], max_entries))
    if kind == "delete":
        sid = raw.get("id")
        if not isinstance(sid, str) or not SANDBOX_ID_RE.match(sid):
            raise PolicyError([f'delete event needs "id", a sandbox id string; got {sid!r:.80}'])
        return Delete(sid)
    if kind == "snapshot":
        items = raw.get("sandboxes")
        if not isinstance(items, list):
            raise PolicyError(['snapshot event needs "sandboxes", a list of sandbox records'])
        out: list[Sandbox] = []
        rejected: list[PolicyError] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            try:
                sb = parse_sandbox(item, max_entries)
            except PolicyError as e:
                problems = [f"sandboxes[{i}]: {p}" for p in e.problems]
                rejected.append(PolicyError(problems, e.sandbox_id, e.netns, e.revision, e.host_interface))
                continue
            if sb.id in seen:
                rejected.append(PolicyError([f"sandboxes[{i}]: sandbox {sb.id!r} is listed twice"], sb.id))
                continue
            seen.add(sb.id)
            out.append(sb)
        return Snapshot(tuple(out), tuple(rejected))
    raise PolicyError([f'unknown event type {kind!r:.40}; expected "upsert", "delete" or "snapshot"'])
