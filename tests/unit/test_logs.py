"""logs.py: log_batch writes the very lines log() writes, and falls back to records wherever the agent's one
handler is not the only way out."""

import io
import json
import logging
import re
from pathlib import Path

import pytest

from egressd.common import logs

FIELDS = {"sandbox": "s1", "kind": "packet", "family": 4, "dst": "198.51.100.7", "dport": 53, "count": 2}


@pytest.fixture
def restore_logger():
    logger = logging.getLogger(logs.LOGGER_NAME)
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield logger
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_a_batch_writes_what_log_writes_line_by_line(restore_logger, fmt):
    out = io.StringIO()
    logs.setup_logging(fmt, "info", out)
    logs.log(logging.INFO, "denied", **FIELDS, entry=None)
    logs.log_batch(logging.INFO, "denied", [FIELDS | {"entry": None}, FIELDS | {"dport": 80}])
    one, *batch = out.getvalue().splitlines()
    assert len(batch) == 2

    def body(line: str) -> object:  # without the time stamp
        return (
            {k: v for k, v in json.loads(line).items() if k != "ts"}
            if fmt == "json"
            else line.split(" ", 1)[1]
        )

    assert body(batch[0]) == body(one)
    assert body(batch[1]) != body(one) and "80" in batch[1]
    if fmt == "text":
        assert all(re.match(r"\d\d:\d\d:\d\d\.\d{3} info denied sandbox=s1 ", x) for x in (one, *batch))
    if fmt == "json":
        assert list(json.loads(batch[0])) == list(json.loads(one))  # the same keys in the same order
        assert "entry" not in json.loads(batch[0])  # None-valued fields left out, as log() does


def test_a_batch_below_the_level_writes_nothing(restore_logger):
    out = io.StringIO()
    logs.setup_logging("json", "warning", out)
    logs.log_batch(logging.INFO, "denied", [FIELDS])
    assert out.getvalue() == ""
    logs.log_batch(logging.WARNING, "denied", [FIELDS])
    assert json.loads(out.getvalue())["level"] == "warning"


def test_another_handler_gets_records_one_by_one(restore_logger):
    """A second handler (a test's capture, an operator's hook) sees each event as its own record."""
    out = io.StringIO()
    logger = logs.setup_logging("json", "info", out)
    seen: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    logger.addHandler(Capture())
    logs.log_batch(logging.INFO, "denied", [FIELDS, FIELDS | {"dport": 80}])
    assert [r.getMessage() for r in seen] == ["denied", "denied"]
    assert [r.fields["dport"] for r in seen] == [53, 80]  # type: ignore[attr-defined]
    assert len(out.getvalue().splitlines()) == 2  # the agent's own handler still wrote both


def test_a_stream_that_fails_stops_nothing(restore_logger, monkeypatch):
    class Broken(io.StringIO):
        def write(self, s: str) -> int:
            raise OSError("disk full")

    logs.setup_logging("json", "info", Broken())
    monkeypatch.setattr(logging, "raiseExceptions", False)  # as in production: the error is swallowed
    logs.log_batch(logging.INFO, "denied", [FIELDS])  # no exception


def test_a_value_json_cannot_encode_is_written_as_its_text(restore_logger):
    out = io.StringIO()
    logs.setup_logging("json", "info", out)
    logs.log(logging.INFO, "state_written", path=Path("/var/lib/egressd/state.json"))
    logs.log_batch(logging.INFO, "state_written", [{"path": Path("/x")}])
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["path"] == "/var/lib/egressd/state.json" and second["path"] == "/x"
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2026-12-03T16:45:00.123Z")
