"""Logs an operator can grep and ship: one JSON object per line, or `--log-format text` for humans.

Every record is an event name plus fields (sandbox, revision, action, duration_ms, error, ...), never a
sentence with values baked in, so log pipelines can filter on them.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

LOGGER_NAME = "egressd"


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return fields if isinstance(fields, dict) else {}


def _msecs(created: float) -> int:
    return int((created - int(created)) * 1000)  # as logging.LogRecord computes msecs


# One encoder for every line, as json.dumps keeps one for its defaults (with arguments it makes one per call).
_ENCODER = json.JSONEncoder(default=str, separators=(",", ":"))


class EventFormatter(logging.Formatter):
    """A record as one line: its time stamp (stamp) and the rest (line) apart, so that log_batch can stamp
    a batch once and write each line exactly as a record of it would be written."""

    clock_pattern = "%H:%M:%S"
    zone = staticmethod(time.localtime)
    zone_suffix = ""

    def format(self, record: logging.LogRecord) -> str:
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            self.stamp(record.created), record.levelname, record.getMessage(), _fields(record), exc
        )

    def stamp(self, created: float) -> str:
        return (
            time.strftime(self.clock_pattern, self.zone(created))
            + f".{_msecs(created):03d}{self.zone_suffix}"
        )

    @staticmethod
    def line(ts: str, level: str, event: str, fields: dict[str, Any], exc: str | None = None) -> str:
        raise NotImplementedError


class JsonFormatter(EventFormatter):
    clock_pattern, zone, zone_suffix = "%Y-%m-%dT%H:%M:%S", staticmethod(time.gmtime), "Z"

    @staticmethod
    def line(ts: str, level: str, event: str, fields: dict[str, Any], exc: str | None = None) -> str:
        doc: dict[str, Any] = {"ts": ts, "level": level.lower(), "event": event}
        doc.update(fields)
        if exc is not None:
            doc["exception"] = exc
        return _ENCODER.encode(doc)


class TextFormatter(EventFormatter):
    """Local time, for humans; the base's stamp."""

    @staticmethod
    def line(ts: str, level: str, event: str, fields: dict[str, Any], exc: str | None = None) -> str:
        parts = [ts, level.lower(), event]
        parts += [f"{k}={v}" for k, v in fields.items()]
        line = " ".join(parts)
        if exc is not None:
            line += "\n" + exc
        return line


class EventHandler(logging.StreamHandler):
    """The agent's one handler. Besides records, it writes many lines of one event at once (log_batch):
    formatted by the same formatter, stamped with one time, under the same lock, with one write and one
    flush."""

    def write_lines(self, level: str, event: str, many: Iterable[dict[str, Any]]) -> None:
        fmt: EventFormatter = self.formatter  # type: ignore[assignment]
        ts, line, end = fmt.stamp(time.time()), fmt.line, self.terminator
        text = "".join(line(ts, level, event, fields) + end for fields in many)
        self.acquire()
        try:
            self.stream.write(text)
            self.flush()
        except Exception:  # noqa: BLE001 - as logging's own emit: a log that cannot be written stops nothing
            self.handleError(logging.makeLogRecord({"msg": event}))
        finally:
            self.release()


def setup_logging(fmt: str = "json", level: str = "info", stream: TextIO | None = None) -> logging.Logger:
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    handler = EventHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger.addHandler(handler)
    logger.setLevel(level.upper())
    logger.propagate = False
    return logger


def log(level: int, event: str, **fields: Any) -> None:
    """Log one event with its fields; None-valued fields are left out."""
    logging.getLogger(LOGGER_NAME).log(
        level, event, extra={"fields": {k: v for k, v in fields.items() if v is not None}}
    )


def log_batch(level: int, event: str, many: Iterable[dict[str, Any]]) -> None:
    """Log one event per fields dict, the lines exactly as log() writes them (None-valued fields left out),
    one write for all of them: a flood of denials publishes thousands a second, and the Logger's work per
    record (a LogRecord, the caller's frame found, a lock, a flush) was three quarters of each one's cost.
    Through log() one by one where the logger is not the agent's one handler (tests capturing records)."""
    logger = logging.getLogger(LOGGER_NAME)
    if not logger.isEnabledFor(level):
        return
    clean = ({k: v for k, v in fields.items() if v is not None} for fields in many)
    handler = _sole_handler(logger, level)
    if handler is not None:
        handler.write_lines(logging.getLevelName(level), event, clean)
        return
    for fields in clean:
        logger.log(level, event, extra={"fields": fields})


def _sole_handler(logger: logging.Logger, level: int) -> EventHandler | None:
    """The agent's handler, when a record of `level` would go to it and nowhere else, unfiltered."""
    handlers = logger.handlers
    if logger.propagate or logger.filters or len(handlers) != 1:
        return None
    h = handlers[0]
    ok = type(h) is EventHandler and h.level <= level and not h.filters
    ok = ok and isinstance(h.formatter, EventFormatter)
    return h if ok else None
