"""Denials benchmark: what reporting denied packets costs the agent while many sandboxes flood denied packets.

N sandbox namespaces (default 200), each with a route out through a veth pair of its own (both ends inside)
and the policy {"allow_internet_access": true, "deny_out": ["203.0.113.0/24"]}, enforced by one agent from
its file feed. Every sandbox then sends denied UDP datagrams to 203.0.113.0/24 (documentation addresses,
varying address and port) for T seconds, from one sender process outside the agent (bench/denials_flood.py).
In each repeat the agent runs with `[denials] log = true` and, alternately first, with `log = false` (tables
without the logging chains: the baseline), on the same namespaces and the same flood. Measured: the agent's
CPU time (utime + stime of /proc/PID/stat) idle and during the flood, `status` latency during it, the events
made against the kernel's rate bound, the agent's RSS after. Run as root from the project root:
`python -m bench.denials` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.agent import (
    RESYNC_S,
    BatchNamespaces,
    ColdWorld,
    KernelView,
    _check_alive,
    check_fingerprints,
    ensure_fd_limit,
    phase_errors,
    proc_figures,
    ruleset_for,
    sandbox_doc,
    start_agent,
    write_feed,
)
from bench.apply import Aborted, Deadline, began, machine_info
from bench.denials_figures import Run, mode_figures, report
from bench.denials_flood import (
    Flooder,
    StatusPinger,
    add_routes,
    agent_cpu,
    delta,
    settled,
    wait_watched,
)
from bench.figures import Figure
from egressd.model.config import Config, load_config
from tests.integration.agent import AgentProcess

GOAL_CORES = 0.1  # agent CPU with logging, N=200 sandboxes flooding
DENIED_NET = "203.0.113.0/24"
POLICY = {"allow_internet_access": True, "deny_out": [DENIED_NET]}
MODES = ("log", "nolog")  # [denials] log = true (egressd) / false (the baseline)
SETTLE_S = 1.0  # after every sandbox is enforced and watched, before the idle measurement
TAIL_S = 2.0  # after the flood: the last one-second windows close and are published


def flood_phase(rep: Run, agent: AgentProcess, flooder: Flooder, args: Any, dl: Deadline) -> None:
    """The CPU figure: the flood alone (nobody asks the agent anything), and the TAIL_S after it."""
    assert agent.proc is not None
    pid = agent.proc.pid
    before = agent.agent_status()
    c0 = agent_cpu(pid)
    rep.flood = flooder.flood(args.seconds, dl)
    c1 = agent_cpu(pid)
    time.sleep(TAIL_S)
    rep.flood_cpu_s, rep.tail_cpu_s = c1 - c0, agent_cpu(pid) - c1
    rep.denials, rep.monitor = delta(before, settled(agent, dl))


def status_phase(rep: Run, agent: AgentProcess, flooder: Flooder, args: Any, dl: Deadline) -> None:
    """The same flood again, shorter, with `status` asked STATUS_EVERY_S and each answer timed (kept out
    of the CPU figure: each answer costs the agent work in proportion to N)."""
    before = agent.agent_status()
    pinger = StatusPinger(agent.socket)
    pinger.start()
    try:
        rep.status_flood = flooder.flood(args.status_seconds, dl)
    finally:
        pinger.finish()
    rep.status_ms, rep.status_errors = pinger.ms, pinger.errors
    time.sleep(TAIL_S)
    rep.status_denials, _ = delta(before, settled(agent, dl))


def one_run(
    rep: Run,
    agent: AgentProcess,
    world: ColdWorld,
    flooder: Flooder,
    view: KernelView,
    args: Any,
    dl: Deadline,
) -> None:
    """Start the agent on the enforced sandboxes, check their tables, measure it idle, then flooded."""
    _, rep.start_s, _ = start_agent(agent, world, dl, f"start ({rep.mode})")
    wait_watched(agent, len(world.names), dl)
    check_fingerprints(view, world, rep.mode, dl)
    # Only the sandboxes' namespaces count: the host's group (host-side denials, unused here) may be held by
    # another agent on this machine.
    mine = set(world.paths())
    if unbound := [e for e in agent.events("denial_log_unavailable") if e.get("netns") in mine]:
        raise RuntimeError(
            f"the agent could not bind the log group in {len(unbound)} sandboxes: {unbound[0]}"
        )
    assert agent.proc is not None
    pid = agent.proc.pid
    time.sleep(SETTLE_S)
    c0, t0 = agent_cpu(pid), time.monotonic()
    time.sleep(args.idle)
    rep.idle_cpu_s, rep.idle_s = agent_cpu(pid) - c0, time.monotonic() - t0
    flood_phase(rep, agent, flooder, args, dl)
    status_phase(rep, agent, flooder, args, dl)
    rep.rss_kib = proc_figures(pid).get("vmrss_kib")
    rep.log_bytes = agent.log_path.stat().st_size
    _check_alive(agent, f"the flood ({rep.mode})")
    rep.verified = True


def worlds(names: Sequence[str], configs: dict[str, Config]) -> dict[str, ColdWorld]:
    """The same records under each mode's config: the rulesets (and fingerprints) each agent must enforce."""
    records = [sandbox_doc(f"sb-{i}", n, 1, POLICY) for i, n in enumerate(names)]
    snapshot = {"type": "snapshot", "sandboxes": records}
    out = {
        m: ColdWorld(list(names), records, [ruleset_for(r, c) for r in records], snapshot)
        for m, c in configs.items()
    }
    if out["log"].rulesets[0].fingerprint == out["nolog"].rulesets[0].fingerprint:
        raise RuntimeError("the tables with and without logging have the same fingerprint")
    return out


def run_all(
    args: argparse.Namespace, work: Path, ns: BatchNamespaces, runs: list[Run], dl: Deadline
) -> Config:
    """R repeats, each running both agents in turn (even repeats logging first), on the same namespaces."""
    agents = {
        m: AgentProcess(
            work / m, resync_interval=RESYNC_S, extra_config=f"[denials]\nlog = {str(m == 'log').lower()}\n"
        )
        for m in MODES
    }
    configs = {m: load_config(str(a.config_path), {}) for m, a in agents.items()}
    names = ns.create_named([f"d{i}" for i in range(args.sandboxes)], dl)
    add_routes(names, dl)
    by_mode = worlds(names, configs)
    for m, a in agents.items():
        write_feed(a, by_mode[m])
    view = KernelView(cache=False)
    flooder = Flooder(names, args.sandboxes * args.rate, dl)
    try:
        for r in range(args.repeats):
            for m in MODES if r % 2 == 0 else MODES[::-1]:
                runs.append(Run(m, r))
                try:
                    one_run(runs[-1], agents[m], by_mode[m], flooder, view, args, dl)
                finally:
                    agents[m].stop()
    finally:
        flooder.close()
        view.close()
    return configs["log"]


# --- figures ------------------------------------------------------------------------------------------


def to_json(
    args: argparse.Namespace, runs: list[Run], config: Config, info: dict[str, Any], errors: list[str]
) -> dict[str, Any]:
    modes = {m: mode_figures([r for r in runs if r.mode == m], args.sandboxes, config) for m in MODES}
    log, base = modes["log"], modes["nolog"]
    per_event = per_packet = None
    if log.get("events") and log["flood_cpu_s"] is not None and base["flood_cpu_s"] is not None:
        per_event = 1e6 * (log["flood_cpu_s"] - base["flood_cpu_s"]) / log["events"]
        per_packet = 1e6 * (log["flood_cpu_s"] - base["flood_cpu_s"]) / log["logged_packets"]
    return {
        "machine": info,
        "sandboxes": args.sandboxes,
        "seconds": args.seconds,
        "rate_per_sandbox": args.rate,
        "status_seconds": args.status_seconds,
        "idle_seconds": args.idle,
        "repeats_asked": args.repeats,
        "log_rate": config.denials.rate,
        "log_burst": config.denials.burst,
        "runs": [{**asdict(r), "flood_cores": r.flood_cores, "idle_cores": r.idle_cores} for r in runs],
        "modes": modes,
        "agent_us_per_event": per_event,
        "agent_us_per_logged_packet": per_packet,
        "goal_cores": GOAL_CORES,
        "verified": bool(runs) and all(r.verified for r in runs),
        "errors": errors,
    }


def summary(results: dict[str, Any]) -> list[Figure]:
    """The agent logging denials against the same agent without, medians over the repeats."""
    modes, n = results.get("modes", {}), results.get("sandboxes")
    log, base = modes.get("log", {}), modes.get("nolog", {})
    other = "the same agent and flood, [denials] log = false"
    cores = log.get("flood_cores")

    def pair(name: str, unit: str, key: str, **kw: Any) -> Figure:
        return Figure("denials", name, unit, log.get(key), base.get(key), other, **kw)

    return [
        pair(
            f"agent CPU, {n} sandboxes flooding denied packets, cores",
            "cores",
            "flood_cores",
            goal=f"<= {GOAL_CORES:g} core at N=200",
            met=None if cores is None else cores <= GOAL_CORES,
            note=f"{log.get('sent_per_s') or 0:.0f} packets/s for {results.get('seconds')} s",
        ),
        pair("agent CPU, idle, cores", "cores", "idle_cores"),
        Figure(
            "denials",
            "denied packets the kernel logged to the agent",
            "packets",
            log.get("logged_packets"),
            log.get("bound"),
            "the kernel's bound N x (burst + rate x T)",
            goal="<= bound",
            met=log.get("within_bound"),
            note=f"of {log.get('denied')} denied",
        ),
        Figure(
            "denials",
            "logged packets the agent dropped (not made events)",
            "packets",
            log.get("dropped_packets"),
            note=f"{log.get('events')} events made; reasons per repeat: {log.get('dropped')}",
        ),
        Figure(
            "denials",
            "agent CPU per logged packet (log minus no log), us",
            "us",
            results.get("agent_us_per_logged_packet"),
            note=f"per event made: {results.get('agent_us_per_event')} us",
        ),
        pair("status during the flood, p99, ms", "ms", "status_p99_ms"),
        pair("status during the flood, max, ms", "ms", "status_max_ms"),
        pair("agent RSS after the flood, MiB", "MiB", "rss_mib"),
        pair("sender CPU per denied packet (its sendto: the table), us", "us", "sender_us_per_packet"),
    ]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.denials", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=200, metavar="N", help="sandboxes flooding (200)")
    p.add_argument("--seconds", type=float, default=10.0, metavar="T", help="flood length (10)")
    p.add_argument("--rate", type=float, default=100.0, help="denied packets/s per sandbox (100)")
    p.add_argument("--status-seconds", type=float, default=3.0, help="second flood, status asked (3)")
    p.add_argument("--idle", type=float, default=3.0, help="seconds of idle CPU measured first (3)")
    p.add_argument(
        "--repeats", type=int, default=3, metavar="R", help="repeats, each running both agents (3)"
    )
    p.add_argument("--max-seconds", type=float, default=300.0, help="abort cleanly after this (300)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write the figures and every sample here")
    p.add_argument("--smoke", action="store_true", help="N=5, T=2 s, idle 1 s, R=1: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.seconds, args.status_seconds, args.idle, args.repeats = 5, 2.0, 1.0, 1.0, 1
    if (
        min(args.sandboxes, args.repeats) < 1
        or min(args.seconds, args.status_seconds, args.rate, args.idle, args.max_seconds) <= 0
    ):
        p.error("every size must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0: complete (the goal is reported, not enforced); 1: a check failed; 2: could not run or aborted."""
    args = parse_args(argv)
    if not began("denials"):
        return 2
    deadline = Deadline(time.monotonic() + args.max_seconds)
    ensure_fd_limit(args.sandboxes)
    ns, runs, errors, aborted = BatchNamespaces(), list[Run](), list[str](), None
    ns.prefix = f"en-{os.getpid()}-"
    config = Config()
    work = Path(tempfile.mkdtemp(prefix="egressd-bench-denials-"))
    try:
        with phase_errors(errors, "flood"):
            config = run_all(args, work, ns, runs, deadline)
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt:
        aborted = "interrupted"
    finally:
        for line in ns.delete():
            print(f"bench.denials: could not delete namespace {line}", file=sys.stderr)
        with contextlib.suppress(OSError):
            shutil.rmtree(work)
    doc = to_json(args, runs, config, machine_info(), errors + ([f"aborted: {aborted}"] if aborted else []))
    report(doc)
    for e in doc["errors"]:
        print(f"FAILED {e}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors or not doc["verified"] else 0


if __name__ == "__main__":
    sys.exit(main())
