"""10,000 sandboxes on one real agent, against the real kernel: cold start, restart, a snapshot that drops half.

Phases: N bare namespaces; a snapshot of N sandboxes in the feed, then `egressd run`: READY, and every
sandbox enforced; a sample of the namespaces read with the nft CLI; SIGTERM and a restart that adopts all
N tables and writes nothing (also in its verification pass); a snapshot that lists every other sandbox:
exactly the others' tables go, the kept ones are not touched (their listings, handles included, are the
same). The wall time of each phase, the agent's RSS and its open descriptors are printed (`-s`) and kept
as the test's `scale` property (`--junitxml`).

The namespaces are bare (loopback only) and live in a private mount namespace (netns_fixtures.bulk): the
host's /run/netns never lists them, and they all go when the test ends, however it ends. What the agent
reports (status over its control socket, its log) is checked against what the kernel holds, read with the
nft CLI inside a random sample of the namespaces: never egressd's word for it.

N defaults to 10,000 (9-10 minutes on the shared 2-vCPU development machine); set EGRESSD_SCALE_N=1000
for a quick local run (about 25 s). Every wait has a deadline, generous because other work shares the
machine: these are functional bounds, not benchmarks (bench/agent.py measures).
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from egressd.agent.control import request
from egressd.model.config import load_config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import render
from netns_fixtures.bulk import BulkNamespaces
from tests.integration.agent import AgentProcess
from tests.integration.conftest import bulk_table

pytestmark = pytest.mark.root

N = int(os.environ.get("EGRESSD_SCALE_N", "10000"))
SAMPLE = min(50, N // 2)
# Deadlines: seconds per 1,000 sandboxes (never below MIN_BUDGET), about 2-4 times what 10,000 took on the
# 2-vCPU development machine while other test runs shared it (load average 3-10): namespaces 6-12 s, every
# sandbox enforced 266-358 s after the start, restart to READY 79-99 s and its verification pass done at
# 122-146 s, half dropped in 87-102 s.
PER_1000 = {"namespaces": 30, "cold": 60, "restart": 40, "verify": 40, "drop": 40, "stop": 10}
MIN_BUDGET = 60.0
STATUS_TIMEOUT = 120.0  # one status answer lists every sandbox; a busy agent may take a while
STATUS_POLL = min(5.0, max(0.5, N / 2000))  # seconds between status requests while waiting


def budget(phase: str) -> float:
    return max(MIN_BUDGET, PER_1000[phase] * N / 1000)


def name(i: int) -> str:
    return f"sc{i:05d}"


def record(i: int) -> dict[str, Any]:
    """Sandbox i: closed, and one address of its own in deny_out, so a table proves whose it is."""
    return {
        "id": name(i),
        "netns": BulkNamespaces.path(name(i)),
        "revision": 1,
        "network_policy": {"allow_internet_access": False, "deny_out": [deny_address(i)]},
    }


def deny_address(i: int) -> str:
    return f"198.18.{i // 256}.{i % 256}"  # 198.18.0.0/15 (benchmarking): up to 131,072 sandboxes


class LogReader:
    """Reads the agent's log incrementally (it grows to tens of thousands of lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = path.stat().st_size if path.exists() else 0
        self.events: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                new.append(json.loads(line))
            except json.JSONDecodeError:
                new.append({"event": "unparsed", "text": line.decode(errors="replace")})
        self.events += new
        return new

    def named(self, event: str) -> list[dict[str, Any]]:
        self.poll()
        return [e for e in self.events if e.get("event") == event]

    def counts(self) -> dict[str, int]:
        self.poll()
        out: dict[str, int] = {}
        for e in self.events:
            out[e.get("event", "?")] = out.get(e.get("event", "?"), 0) + 1
        return out


def wait_until(check: Callable[[], Any], timeout: float, what: str, poll: float = 0.5, agent=None) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if agent is not None and agent.proc is not None and agent.proc.poll() is not None:
            raise AssertionError(
                f"agent exited with {agent.proc.returncode} while waiting for {what}:\n"
                f"{agent.log_path.read_text()[-3000:]}"
            )
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        time.sleep(poll)


def status(a: AgentProcess) -> dict[str, Any]:
    return request(a.socket, {"cmd": "status"}, timeout=STATUS_TIMEOUT)


def usage(pid: int) -> dict[str, Any]:
    """The agent's resident memory (now and peak, MiB) and open descriptors, from /proc."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = round(int(value.split()[0]) / 1024, 1)
    return {
        "rss_mib": fields["VmRSS"],
        "peak_rss_mib": fields["VmHWM"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def check_table(listing: list[dict[str, Any]] | None, i: int, fingerprint: str) -> None:
    """The table in sandbox i's namespace is sandbox i's: its fingerprint, and its own deny address."""
    assert listing is not None, f"{name(i)}: no table in the kernel"
    comments = [x["rule"].get("comment") for x in listing if x.get("rule", {}).get("chain") == "fingerprint"]
    assert comments == [fingerprint], f"{name(i)}: fingerprint {comments}, expected {fingerprint}"
    denied = {
        str(e)
        for x in listing
        if x.get("set", {}).get("name", "").startswith("deny4")
        for e in x["set"].get("elem", ())
    }
    assert denied == {deny_address(i)}, f"{name(i)}: deny4 holds {denied}"


@pytest.fixture
def bulk():
    with BulkNamespaces() as b:
        yield b


def test_ten_thousand_sandboxes_on_one_agent(bulk, tmp_path, record_property):
    figures: dict[str, Any] = {"n": N}
    names = [name(i) for i in range(N)]
    rng = random.Random(os.environ.get("EGRESSD_SCALE_SEED", "1"))

    t0 = time.monotonic()
    bulk.create(names, timeout=budget("namespaces"))
    figures["namespaces_s"] = round(time.monotonic() - t0, 1)
    assert all(bulk.exists(n) for n in rng.sample(names, SAMPLE))

    # A snapshot of every sandbox as one line: about 150 bytes a record, 1.47 MB at 10,000, more than the
    # default max_line_bytes (1 MiB: the agent would skip the line), so the feed takes longer lines here.
    a = AgentProcess(
        tmp_path / "agent", wrap=bulk.wrap(), resync_interval=3600, feed_config="max_line_bytes = 67108864\n"
    )
    a.send({"type": "snapshot", "sandboxes": [record(i) for i in range(N)]})
    fingerprints = {}
    config = load_config(a.config_path)
    for i in range(N):
        fingerprints[i] = render(parse_sandbox(record(i)).policy, config).fingerprint
    log = LogReader(a.log_path)
    try:
        # --- cold start: READY, and every sandbox enforced --------------------------------------------
        t0 = time.monotonic()
        a.start(wait_ready=False)
        (ready,) = wait_until(lambda: log.named("ready"), budget("cold"), "READY after a cold start", agent=a)
        figures["cold_ready_s"] = round(time.monotonic() - t0, 1)
        figures["cold_ready_counts"] = {k: ready[k] for k in ("enforced", "pending", "error")}
        # READY comes once every sandbox was reconciled, or after the agent's own start timeout (then it
        # says so with initial_reconcile_slow, and the rest follows): either way, all get enforced.
        if ready["enforced"] < N:
            assert log.named("initial_reconcile_slow"), ready

        # Progress is followed in the log (a status answer lists every sandbox: it costs the agent work),
        # then confirmed once over the control socket.
        left = budget("cold") - (time.monotonic() - t0)
        wait_until(lambda: len(log.named("applied")) >= N, left, "every sandbox applied", poll=1.0, agent=a)
        st = wait_until(
            lambda: (st := status(a))["agent"]["counts"]["enforced"] == N and st,
            MIN_BUDGET,
            "every sandbox enforced",
            poll=STATUS_POLL,
            agent=a,
        )
        figures["cold_all_enforced_s"] = round(time.monotonic() - t0, 1)
        rows = st["sandboxes"]
        assert len(rows) == N
        assert {r["state"] for r in rows} == {"enforced"}, st["agent"]["counts"]
        assert {r["revision"] for r in rows} == {1} and {r["writes"] for r in rows} == {1}
        figures["cold"] = usage(a.proc.pid)
        figures["cold_log"] = {k: v for k, v in log.counts().items() if k not in ("applied",)}
        assert len(log.named("applied")) == N

        sample = rng.sample(range(N), SAMPLE)
        t0 = time.monotonic()
        before = {}
        for i in sample:
            before[i] = bulk_table(bulk, name(i))
            check_table(before[i], i, fingerprints[i])
        figures["kernel_sample_s"] = round(time.monotonic() - t0, 1)

        # --- restart: every table adopted, nothing written --------------------------------------------
        t0 = time.monotonic()
        assert a.stop(timeout=budget("stop")) == 0
        figures["stop_s"] = round(time.monotonic() - t0, 1)
        restart = LogReader(a.log_path)
        t0 = time.monotonic()
        a.start(wait_ready=False)
        (ready,) = wait_until(
            lambda: restart.named("ready"), budget("restart"), "READY after a restart", agent=a
        )
        figures["restart_ready_s"] = round(time.monotonic() - t0, 1)
        figures["restart_ready_counts"] = {k: ready[k] for k in ("enforced", "pending", "error")}
        if ready["enforced"] == N:
            assert len(restart.named("adopted")) == N  # each on its fingerprint alone: one short read
        else:  # the agent's start timeout ran out first; the rest is compared whole, after READY
            assert restart.named("initial_reconcile_slow"), ready

        # Right before READY the agent queued every sandbox again, to compare each adopted table whole (the
        # verification pass): once the queue is empty that is done, and it wrote nothing either.
        def verified() -> dict[str, Any] | None:
            agent = status(a)["agent"]
            return agent if agent["verified"] and agent["queue"] == 0 else None

        agent = wait_until(
            verified, budget("verify"), "the verification pass after a restart", STATUS_POLL, a
        )
        figures["restart_verified_s"] = round(time.monotonic() - t0, 1)
        figures["restart_reconciles"] = agent["reconciles"]
        assert agent["reconciles"]["unchanged"] + agent["reconciles"]["repaired"] >= N  # every table compared
        st = status(a)
        assert st["agent"]["counts"] == {"enforced": N, "pending": 0, "error": 0}
        assert {r["writes"] for r in st["sandboxes"]} == {0}
        counts = restart.counts()
        assert not {"applied", "repaired", "error", "reconcile_bug"} & set(counts), counts
        figures["restart"] = usage(a.proc.pid)
        figures["restart_log"] = {k: v for k, v in counts.items() if k != "adopted"}
        for i in sample:
            assert bulk_table(bulk, name(i)) == before[i], f"{name(i)}: rewritten by the restart"

        # --- a snapshot that drops half: exactly those tables go, the rest untouched -------------------
        keep = list(range(0, N, 2))
        dropped = [i for i in range(N) if i % 2]
        drop = LogReader(a.log_path)
        t0 = time.monotonic()
        a.send({"type": "snapshot", "sandboxes": [record(i) for i in keep]})

        def dropped_all() -> bool:
            return len(drop.named("removed")) >= len(dropped)

        wait_until(dropped_all, budget("drop"), "removal of half the tables", poll=1.0, agent=a)
        wait_until(lambda: status(a)["agent"]["queue"] == 0, budget("drop"), "an idle queue", STATUS_POLL, a)
        figures["drop_half_s"] = round(time.monotonic() - t0, 1)
        st = status(a)
        assert sorted(r["id"] for r in st["sandboxes"]) == [name(i) for i in keep]
        assert {r["state"] for r in st["sandboxes"]} == {"enforced"}
        assert {r["writes"] for r in st["sandboxes"]} == {0}
        removed = drop.named("removed")
        assert sorted(e["sandbox"] for e in removed) == [name(i) for i in dropped]
        assert all(e.get("detail") is None for e in removed), "a dropped sandbox had no table"
        counts = drop.counts()
        assert not {"applied", "repaired", "error", "remove_failed", "reconcile_bug"} & set(counts), counts
        figures["drop"] = usage(a.proc.pid)
        for i in rng.sample(dropped, SAMPLE):
            assert bulk_table(bulk, name(i)) is None, f"{name(i)}: dropped, but its table is still there"
        for i in sample:
            if i % 2 == 0:
                assert bulk_table(bulk, name(i)) == before[i], f"{name(i)}: kept, but its table changed"
        for i in rng.sample(keep, SAMPLE):
            check_table(bulk_table(bulk, name(i)), i, fingerprints[i])
    finally:
        t0 = time.monotonic()
        a.stop(timeout=budget("stop"))
        figures["final_stop_s"] = round(time.monotonic() - t0, 1)
        figures["namespaces_delete_s"] = round(bulk.close(), 1)
        print(f"\nscale figures: {json.dumps(figures)}")
        record_property("scale", json.dumps(figures))
