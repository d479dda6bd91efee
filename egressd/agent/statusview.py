"""How the agent's answers to `status` look on a terminal: a summary line, then one row per sandbox (and per
host name it names) or, for `status --dns`, one row per cached name. `--json` prints the answers as they
are."""

from __future__ import annotations

import time
from typing import Any


def age(since: float | None) -> str:
    if since is None:
        return "-"
    secs = max(0, int(time.time() - since))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{secs // size}{unit}"
    return f"{secs}s"


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1])


def addresses(view: dict[str, Any]) -> str:
    addrs = view.get("addresses") or []
    return ", ".join(addrs) if addrs else "-"


def print_dns(answer: dict[str, Any]) -> None:
    """`egressd status --dns`: the agent's DNS cache, one row per name; then what each intercepted
    sandbox's own answers put in force."""
    info = answer["dns"]
    print(
        f"{info['names']} names, {info['queries']} resolutions, {info['failures']} failed; "
        f"nameservers {info['nameservers']}"
    )
    rows = [("NAME", "STATE", "TTL", "REFRESH IN", "SANDBOXES", "ADDRESSES", "ERROR")]
    for v in answer["names"]:
        ttl = "-" if v.get("ttl") is None else f"{v['ttl']:g}s"
        rows.append(
            (
                v["name"],
                v["state"],
                ttl,
                f"{v['refresh_in']:g}s",
                str(v["sandboxes"]),
                addresses(v),
                v["error"] or "",
            )
        )
    print_table(rows)
    learned = answer.get("learned") or {}
    if learned:
        print("\nlearned from the sandboxes' own DNS answers (interception):")
        rows = [("SANDBOX", "ADDRESS", "NAMES", "EXPIRES IN")]
        for sid, view in sorted(learned.items()):
            shown = view["addresses"] or [{"address": "-", "names": [], "expires_in": None}]
            for a in shown:
                left = "-" if a["expires_in"] is None else f"{a['expires_in']}s"
                rows.append((sid, a["address"], ", ".join(a["names"]) or "?", left))
            if view["learned"] > len(view["addresses"]):
                rows.append((sid, f"... {view['learned'] - len(view['addresses'])} more", "", ""))
        print_table(rows)


def print_status(answer: dict[str, Any]) -> None:
    """`egressd status`: the agent, its feed and state file, then the sandboxes."""
    agent = answer["agent"]
    counts = agent["counts"]
    print(
        f"egressd {agent['version']} pid {agent['pid']}, up {age(agent['started'])}: "
        f"{counts['enforced']} enforced, {counts['pending']} pending, {counts['error']} error; "
        f"feed {agent['feed'].get('source')} "
        f"({agent['feed']['lines']} lines, {agent['feed']['rejected']} rejected)"
    )
    feed = agent["feed"]
    if "bucket" in feed:  # nats://: say whether the host follows its keys, and why not
        if feed.get("connected"):
            print(
                f"feed: following {feed['host_id']}.* in bucket {feed['bucket']} on {feed['server']}: "
                f"{feed['keys']} keys, revision {feed['revision']}"
            )
        else:
            print(
                "feed: NOT connected, enforcing the last known state: "
                + (feed.get("last_error") or "connecting")
            )
    if agent["state"]["error"]:
        print(f"state: {agent['state']['error']}")
    rows = [("SANDBOX", "STATE", "REVISION", "SINCE", "NETNS", "ERROR")]
    for sb in answer["sandboxes"]:
        rev = "-" if sb["revision"] is None else str(sb["revision"])
        rows.append((sb["id"], sb["state"], rev, age(sb["since"]), sb["netns"] or "-", sb["error"] or ""))
        proxy = sb.get("dns_proxy")
        if proxy is not None:
            names = sorted({n for a in proxy["addresses"] for n in a["names"]})
            shown = ", ".join(a["address"] for a in proxy["addresses"][:5]) or "-"
            rows.append(
                (
                    "  dns proxy",
                    "answering",
                    "",
                    "",
                    shown,
                    f"{proxy['learned']} learned: {', '.join(names[:5])}",
                )
            )
        for h in sb.get("hostnames", []):
            detail = f"refresh in {h.get('refresh_in', 0):g}s" + (f"; {h['error']}" if h.get("error") else "")
            rows.append((f"  {h['list']} {h['name']}", h.get("state", "?"), "", "", addresses(h), detail))
    print_table(rows)
    denials = answer.get("denials")
    if denials is not None:  # `status SANDBOX`
        from egressd.agent.denialview import line

        print("\nlast denials:" if denials else "\nno denials kept")
        for event in denials:
            print("  " + line(event))
