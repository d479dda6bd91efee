"""The feed's lines into desired state: parse each line (or take the record a source parsed itself), log what
is refused with its place and reason, and hand the rest to the reconciler. Bad input never stops the agent."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

from egressd.common.logs import log
from egressd.feed.lines import Line
from egressd.model.events import Event, parse_line
from egressd.model.sandbox import PolicyError


class DesiredSink(Protocol):
    def reject(self, err: PolicyError, latest: bool = False) -> None: ...

    def handle(self, event: Event) -> None: ...


class FeedIntake:
    """Counts what it read and refused (status and metrics show both)."""

    def __init__(self, desired: DesiredSink, max_entries: Callable[[], int]) -> None:
        self._desired = desired
        self._max_entries = max_entries
        self.lines = 0
        self.rejected = 0

    def on_line(self, line: Line) -> None:
        """One line of the feed (or one key of a bucket)."""
        self.lines += 1
        where: dict[str, Any] = (
            {"source": line.source, "line": line.lineno}
            if line.key is None
            else {"source": line.source, "key": line.key, "revision": line.lineno}
        )
        if line.text is None and line.event is None:
            self._rejected(where, line.error or "refused")
            return
        event: Event | PolicyError
        if line.event is not None:
            event = line.event  # a source that parses its own records (nats://)
        else:
            try:
                event = parse_line(line.text or "", self._max_entries())
            except PolicyError as e:
                event = e
        if isinstance(event, PolicyError):
            self._rejected(where, "; ".join(event.problems), sandbox=event.sandbox_id)
            if event.sandbox_id is not None:
                self._desired.reject(event)  # an invalid upsert: close a new one, keep a known one as it is
            return
        for err in getattr(event, "rejected", ()):
            self._rejected(where, "; ".join(err.problems), sandbox=err.sandbox_id)
        self._desired.handle(event)

    def _rejected(self, where: dict[str, Any], reason: str, sandbox: str | None = None) -> None:
        self.rejected += 1
        log(logging.WARNING, "feed_line_rejected", sandbox=sandbox, error=reason, **where)
