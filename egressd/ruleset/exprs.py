"""The pieces every rendered rule is made of: libnftables JSON for a match, a payload or meta field, a
rule in egressd's table, and the verdicts. Shared by render.py (the policy's table) and dnsrules.py (what
DNS interception adds to it).
"""

from __future__ import annotations

from typing import Any

FAMILY = "inet"
TABLE = "egressd"
T = {"family": FAMILY, "table": TABLE}
Json = dict[str, Any]


def match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def payload(protocol: str, field: str) -> Json:
    return {"payload": {"protocol": protocol, "field": field}}


def meta(key: str) -> Json:
    return {"meta": {"key": key}}


def match_daddr(version: int, set_name: str) -> Json:
    return match(payload("ip" if version == 4 else "ip6", "daddr"), f"@{set_name}")


def rule(chain: str, *expr: Json, comment: str | None = None) -> Json:
    body: Json = {**T, "chain": chain, "expr": list(expr)}
    if comment is not None:
        body["comment"] = comment
    return {"add": {"rule": body}}


ACCEPT: Json = {"accept": None}
CT_MARK: Json = {"ct": {"key": "mark"}}
DENY: Json = {"jump": {"target": "deny"}}
