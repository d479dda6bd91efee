"""Memory and descriptors per intercepted sandbox (bench.intercept_scale): the agent cold-started over N
sandboxes whose policies name only addresses, then over N whose policies name hosts, in pairs.

Why pairs, and why more than one: what one intercepted sandbox costs in the agent's heap (its proxy's
sockets and objects) is small next to how much two starts of the same agent differ (glibc's arenas settle
differently each time), so one pair can even come out negative. Each pair is like for like: the first starts
over empty namespaces, a later one over the tables the agents before it left (so both of its agents adopt).
RSS and descriptors are read 1 s after the agent's verification pass, which ends with a heap trim.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from bench.agent import RESYNC_S, proc_figures, rotate_log, wait_started
from bench.apply import Deadline
from tests.integration.agent import AgentProcess

SETTLE_S = 1.0  # after the verification pass (and the heap trim after it), before RSS is read


def cold_start(
    tmp: Path, name: str, router: str, records: list[dict[str, Any]], config: str, deadline: Deadline
) -> tuple[AgentProcess, dict[str, Any]]:
    """An agent started over a snapshot of `records`; its RSS and descriptors once all are enforced and the
    verification pass is over."""
    agent = AgentProcess(tmp / name, netns=router, resync_interval=RESYNC_S, extra_config=config)
    agent.send({"type": "snapshot", "sandboxes": records})
    tail = rotate_log(agent)
    t0 = time.monotonic()
    agent.start(wait_ready=False)
    try:
        expected = {r["id"]: 1 for r in records}
        ready, done, rows = wait_started(agent, tail, expected, deadline, f"the {name} agent's start")
        while not any(e.get("event") == "verified" for e in tail.new_events()):
            deadline.check(f"the {name} agent's verification pass")
            time.sleep(0.05)
        verified = time.monotonic()
        time.sleep(SETTLE_S)
        assert agent.proc is not None
        figures = proc_figures(agent.proc.pid)
    except BaseException:
        agent.stop()
        raise
    intercepted = sum(1 for r in rows if r.get("dns_proxy") is not None)
    times = {"ready_s": ready - t0, "enforced_s": done - t0, "verified_s": verified - t0}
    return agent, {**times, "intercepted": intercepted, **figures}


def pair(plain: dict[str, Any], named: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "address_only": plain,
        "intercepted": named,
        "rss_kib_per_sandbox": (named["vmrss_kib"] - plain["vmrss_kib"]) / n,
        "fds_per_sandbox": (named["fds"] - plain["fds"]) / n,
    }


def memory_phase(
    tmp: Path, router: str, records: tuple[list[dict[str, Any]], list[dict[str, Any]]], repeats: int,
    config: str, deadline: Deadline, out: dict[str, Any],
) -> AgentProcess:  # fmt: skip
    """`repeats` pairs of starts (address-only, then intercepted) into out["pairs"]; the medians and ranges
    per sandbox into out["per_sandbox"]. Returns the last intercepting agent, running."""
    plain_records, named_records = records
    n = len(named_records)
    out["pairs"] = []
    agent: AgentProcess | None = None
    for r in range(repeats):
        plain_agent, plain = cold_start(tmp, f"address-only-{r}", router, plain_records, config, deadline)
        plain_agent.stop()
        out["pairs"].append({"address_only": plain})  # kept if the next start fails
        agent, named = cold_start(tmp, f"intercepting-{r}", router, named_records, config, deadline)
        out["pairs"][-1] = pair(plain, named, n)
        if r + 1 < repeats:
            agent.stop()
    assert agent is not None
    rss = [p["rss_kib_per_sandbox"] for p in out["pairs"]]
    fds = [p["fds_per_sandbox"] for p in out["pairs"]]
    out["per_sandbox"] = {
        "rss_kib": statistics.median(rss),
        "rss_kib_range": [min(rss), max(rss)],
        "fds": statistics.median(fds),
        "fds_range": [min(fds), max(fds)],
    }
    out["intercepted_counts"] = [(p["address_only"]["intercepted"], p["intercepted"]["intercepted"])
                                 for p in out["pairs"]]  # fmt: skip
    return agent
