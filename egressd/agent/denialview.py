"""`egressd denials`: the agent's denial events on a terminal, one line each (or one JSON object per line
with --json), and --follow as a chain of long polls on the control socket (each answer names the last
event; the next request asks for what follows it)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any, TextIO

from egressd.agent.control import request

POLL_S = 30.0  # how long one follow request waits for the next event


def line(event: dict[str, Any]) -> str:
    """One event as a terminal line: when, which sandbox, what was tried, the step, the entry."""
    when = time.strftime("%H:%M:%S", time.localtime(event["ts"]))
    if event["kind"] == "dns":
        what = f"dns query {event['name']}"
    else:
        what = event["dst"]
        if event.get("dport") is not None:
            what = f"[{what}]:{event['dport']}" if event["family"] == 6 else f"{what}:{event['dport']}"
        what = f"{event['proto']} {what}"
    out = f"{when}  {event['sandbox']}  {what}  denied by {event['step']}"
    if event.get("entry") is not None:
        out += f" {event['entry']}"
    if event.get("host") is not None and event.get("host") != event.get("entry"):
        out += f" (host {event['host']})"
    if event["count"] > 1:
        out += f"  x{event['count']}"
    return out


def show(events: list[dict[str, Any]], as_json: bool, out: TextIO) -> None:
    for event in events:
        out.write((json.dumps(event, separators=(",", ":")) if as_json else line(event)) + "\n")
    out.flush()


def denials(
    path: str, sandbox: str | None, since: float | None, follow: bool, as_json: bool, out: TextIO = sys.stdout
) -> int:
    """Print the kept events (newer than `since` seconds), then, with follow, every new one until
    interrupted. Exit 0; a control error goes up to the caller, which says what to do."""
    answer = request(path, {"cmd": "denials", "id": sandbox, "since": since})
    show(answer["events"], as_json, out)
    if not follow:
        if not answer["events"] and not as_json:
            print(f"no denials kept{' for ' + sandbox if sandbox else ''}", file=sys.stderr)
        return 0
    after = answer["last"]
    try:
        while True:
            req = {"cmd": "denials", "id": sandbox, "after": after, "wait": POLL_S}
            answer = request(path, req, timeout=POLL_S + 5)
            show(answer["events"], as_json, out)
            after = answer["last"]
    except KeyboardInterrupt:
        return 0
