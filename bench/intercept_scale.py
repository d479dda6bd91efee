"""DNS interception at scale: queries per second across 1,000 intercepted sandboxes, memory and descriptors
per intercepted sandbox, and the DNS gap during a restart.

One throwaway world (internet, router, one veth sandbox) plus N bare namespaces and N sandboxes made cheaply:
a sink interface (ifb) with an address and a default route each, so a query to any address reaches the output
hook, where egressd's table redirects it to its proxy; nothing else can answer there. The agent runs in the
router with `[dns] intercept = true`; its upstream is a PoolDnsServer (bench.intercept_scale_upstream, a
process of its own, TTL counting down like a cache's) in the internet. In one run:

1. Memory: the agent cold-started over N sandboxes whose policies name only addresses (not intercepted),
   stopped, then over N whose policies name hosts (intercepted), twice (bench.intercept_scale_memory): RSS
   and descriptors 1 s after each start's verification pass; the difference divided by N.
2. Rate: an open-loop generator (bench.intercept_scale_load: one process, one UDP socket per sandbox made
   once inside its namespace) ramps the offered rate, queries spread round-robin over the N sandboxes, each
   to 203.0.113.253 (nothing listens; egressd answers). Per step: p50/p99/max latency, the answered
   fraction, kernel writes per query (commits counted in a sample of sandboxes), CPU of agent, upstream,
   generator and of everything else on the machine (/proc/stat; a failed step during which the rest kept
   more than half a CPU busy is run again, twice at most). Baseline, alternating with it at each rate: the
   same load from N sockets in the agent's namespace straight to the upstream, which shows what the
   generator and the upstream manage on their own. They all share the machine's CPUs. Two loads: A queries
   for a name of 4 addresses, already learned after a warm-up (no kernel write), and AAAA queries whose
   every answer is a new address (a write each). The figure: the highest rate of a step with p99 <= 20 ms
   and every query answered within 1 s (the first failed rate is beside it).
3. Restart: a client in one intercepted sandbox (the veth one) asks every 10 ms (50 ms each) while the
   agent is SIGTERMed and started again with N + 1 sandboxes; meanwhile the learned set is read and TCP
   tried to its addresses (bench.intercept_scale_restart).

The upstream's TTL counts down, as a real resolver's cache does: the proxy writes an address again only when
that makes its time in the kernel grow by more than a second, so with a fixed TTL every answer more than a
second after the last one for the same address would be a write, and a "learned" load would be all writes.
The generator's sockets are made once, so each sandbox's queries share one conntrack flow: a stub resolver
with a new port per query also makes the kernel set up a flow (and its NAT) per query.

An agent that dies ends the run, with its exit status and last log lines in the result (at commit 59e72ae it
aborts at about 200 intercepted sandboxes: its proxies' descriptors fill 0-1023 and libnftables' select()
then meets a descriptor of 1024 or more). Run as root from the project root:
`python -m bench.intercept_scale [--smoke] [--sandboxes N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.agent import BatchNamespaces, ensure_fd_limit, proc_figures, sandbox_doc
from bench.apply import Deadline, began, machine_info
from bench.figures import Figure
from bench.intercept_scale_load import (
    GOAL_P99_MS,
    INTERSTEP_S,
    Generator,
    best_rate,
    counted,
    cpu_seconds,
    first_failed,
    machine_load,
    machine_ticks,
    noisy,
    query_wire,
    setup_sandboxes,
    step_row,
    udp_socket,
    wait_quiet,
    watch_socket,
)
from bench.intercept_scale_memory import memory_phase
from bench.intercept_scale_restart import restart_gap
from bench.intercept_scale_upstream import FRESH_NAME, Upstream
from netns_fixtures import SandboxNS, World, cleanup
from tests.integration.agent import AgentProcess

UPSTREAM = "192.0.2.153"  # the PoolDnsServer, in the world's internet
NOWHERE = "203.0.113.253"  # what the sandboxes ask: nothing listens there
POOL_NAME = "pool.bench.test"
POOL = [f"198.51.100.{i}" for i in range(100, 104)]  # one of the 4 in each answer
NEVER_GIVEN = "198.51.100.7"
TTL = 3000  # counting down: longer than any run, below max_ttl
ADDRESS_POLICY = {"allow_internet_access": False, "allow_out": ["198.51.100.8/32"]}
NAMES_POLICY = {"allow_internet_access": False, "allow_out": [POOL_NAME, FRESH_NAME]}
AGENT_CONFIG = f'[dns]\nintercept = true\nnameservers = ["{UPSTREAM}"]\nmax_ttl = 3600\n'
NOISY_RETRIES = 2  # a noisy failed step is run again up to this many times
QUIET_BOUND_S = 20.0  # before the load, at most this long waiting for the machine to settle
WAYS = ("direct", "intercepted")
PHASES = {"learned": (POOL_NAME, "A"), "fresh": (FRESH_NAME, "AAAA")}
PHASE_LABEL = {"learned": "answers already learned", "fresh": "every answer a new address"}
BASE_NAME = "the same load from the agent's namespace straight to the upstream"
GOAL = f"p99 <= {GOAL_P99_MS:g} ms"
DEFAULT_OUT = Path(__file__).resolve().parent / "results-intercept-scale.json"


def code_version() -> dict[str, Any]:
    """The commit, and whether egressd/ differs from it: the figures belong to the code that ran."""

    def git(*argv: str) -> str:
        proc = subprocess.run(["git", *argv], capture_output=True, text=True, timeout=10, check=False)
        return proc.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "egressd_changed": git("status", "--porcelain", "egressd")}


def measured_step(
    gen: Generator, wire: bytes, rate: float, args: argparse.Namespace, pids: dict[str, int | None],
    deadline: Deadline,
) -> dict[str, Any]:  # fmt: skip
    """One step, with the CPU each process used during it, and the whole machine's (in CPUs: 1.0 is one
    CPU busy all along); `others`: the machine's less ours (the kernel's softirq work for our packets
    included)."""
    before, machine = {k: cpu_seconds(p) for k, p in pids.items()}, machine_ticks()
    t0 = time.monotonic()
    tally = gen.step(wire, rate, args.step_seconds, args.timeout, deadline)
    wall = time.monotonic() - t0
    cpu = {k: round((cpu_seconds(p) - before[k]) / wall, 3) for k, p in pids.items()}
    cpu.update({f"machine_{k}": v for k, v in machine_load(machine).items()})
    cpu["others"] = round(cpu.get("machine_busy", 0.0) - cpu["agent"] - cpu["upstream"] - cpu["generator"], 3)
    gen.pause(INTERSTEP_S)
    return step_row(tally, rate, args.step_seconds, cpu)


def progress(way: str, row: dict[str, Any]) -> None:
    note = "  (noisy)" if noisy(row) else ""
    print(f"  {way:<12} {row['rate']:>6g}/s  p99 {_f(row['p99_ms'])} ms  answered {row['answered']}"
          f"/{row['sent']}{note}", file=sys.stderr, flush=True)  # fmt: skip


def ramp(
    gens: dict[str, Generator], wire: bytes, args: argparse.Namespace, pids: dict[str, int | None],
    deadline: Deadline,
) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Both ways at each rate, in alternating order. A noisy failed step is run again (up to NOISY_RETRIES
    times; the rows stay, marked `superseded`); a way stops after two failed steps in a row (one can be the
    machine's noise: a step's p99 is its 1 % slowest)."""
    out: dict[str, list[dict[str, Any]]] = {way: [] for way in WAYS}

    def done(way: str) -> bool:
        rows = counted(out[way])
        return len(rows) >= 2 and not (rows[-1]["ok"] or rows[-2]["ok"])

    for i, rate in enumerate(args.rates):
        for way in [w for w in (WAYS if i % 2 else WAYS[::-1]) if not done(w)]:
            for attempt in range(1 + NOISY_RETRIES):
                row = measured_step(gens[way], wire, rate, args, pids, deadline)
                out[way].append(row)
                progress(way, row)
                row["superseded"] = noisy(row) and attempt < NOISY_RETRIES
                if not row["superseded"]:
                    break
        if all(done(w) for w in WAYS):
            break
    return out


def load_phases(
    gens: dict[str, Generator], args: argparse.Namespace, pids: dict[str, int | None], deadline: Deadline,
    results: dict[str, Any],
) -> None:  # fmt: skip
    """Per load, a warm-up of both ways, not counted (one query per sandbox; for the learned load
    `--warmup` per sandbox, so each learns the pool; the first answers of a kind pay for lazy imports and the
    like), then its ramp."""
    n = len(gens["intercepted"].socks)
    results["quiet_before_load"] = wait_quiet(2.0 if args.smoke else QUIET_BOUND_S)
    warm_rate = min(args.warmup_rate, 10.0 * n)
    results["phases"] = {}
    for phase, (name, rdtype) in PHASES.items():
        print(f"bench.intercept_scale: {phase}", file=sys.stderr, flush=True)
        wire = query_wire(name, rdtype)
        warm = {}
        for way in WAYS:
            per = args.warmup if phase == "learned" and way == "intercepted" else 1
            warm_args = argparse.Namespace(**{**vars(args), "step_seconds": per * n / warm_rate})
            warm[way] = measured_step(gens[way], wire, warm_rate, warm_args, pids, deadline)
        rows = ramp(gens, wire, args, pids, deadline)
        results["phases"][phase] = {
            "name": name,
            "type": rdtype,
            "warmup": warm,
            "steps": rows,
            "best_rate": {way: best_rate(rows[way]) for way in WAYS},
            "first_failed_rate": {way: first_failed(rows[way]) for way in WAYS},
        }


@dataclass
class Held:
    """What run() must stop whatever happens."""

    agent: AgentProcess | None = None
    upstream: Upstream | None = None
    gens: dict[str, Generator] = field(default_factory=dict)

    def close(self) -> None:
        for gen in self.gens.values():
            gen.close()
        if self.agent is not None:
            self.agent.stop()
        if self.upstream is not None:
            self.upstream.close()


def load(held: Held, router: str, icpt: list[str], args: argparse.Namespace, deadline: Deadline,
         results: dict[str, Any]) -> None:  # fmt: skip
    """The generators (one socket per sandbox; as many in the router for the baseline), then the ramps."""
    assert held.agent is not None and held.agent.proc is not None and held.upstream is not None
    n = len(icpt)
    sample = list(range(0, n, max(1, n // args.sample)))[: args.sample]
    held.gens["intercepted"] = Generator([udp_socket(ns, NOWHERE) for ns in icpt],
                                         [watch_socket(icpt[i]) for i in sample], sample)  # fmt: skip
    held.gens["direct"] = Generator([udp_socket(router, UPSTREAM) for _ in icpt])
    pids = {"agent": held.agent.proc.pid, "upstream": held.upstream.pid, "generator": None}
    load_phases(held.gens, args, pids, deadline, results)
    warm = results["phases"]["learned"]["warmup"]["intercepted"]
    results["checks"]["warmup_answered_at_nowhere"] = (warm["answered_fraction"] or 0.0) >= 0.99
    results["upstream"] = held.upstream.ask("counts")
    results["memory"]["intercepted_after_load"] = proc_figures(held.agent.proc.pid)
    rows = held.agent.status()
    results["learned_total"] = sum((r.get("dns_proxy") or {}).get("learned", 0) for r in rows.values())


def restart(agent: AgentProcess, probe_sb: SandboxNS, ids: Sequence[str], deadline: Deadline,
            results: dict[str, Any]) -> None:  # fmt: skip
    """The veth sandbox joins as one more intercepted sandbox (it reaches the internet's TCP servers, so
    learned addresses can be tried while the agent is down), then the restart."""
    agent.upsert("probe", probe_sb.netns_path, 1, **NAMES_POLICY)
    if not agent.wait("probe", 1, timeout=min(15.0, deadline.timeout("the probe sandbox"))):
        raise RuntimeError(f"the probe sandbox is not enforced: {agent.status().get('probe')}")
    expected = {**dict.fromkeys(ids, 1), "probe": 1}
    names = (NOWHERE, POOL_NAME, POOL, NEVER_GIVEN)
    r = results["restart"] = restart_gap(agent, expected, probe_sb.name, names, deadline)
    for key in ("learned_kept", "tcp_open_while_down", "never_given_closed_while_down"):
        results["checks"][key] = r[key]


def run(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Fills `results` as it goes, so an aborted run still reports what it measured."""
    deadline = Deadline(time.monotonic() + args.max_seconds)
    prefix = f"bs{os.getpid() % 10000}"
    cleanup(prefix)
    results.update(machine=machine_info(), code=code_version(), fd_limit=ensure_fd_limit(4 * args.sandboxes))
    n = args.sandboxes
    spaces = BatchNamespaces()
    held = Held()
    with World(prefix, sandboxes=1) as world, tempfile.TemporaryDirectory() as tmp:
        try:
            bare = spaces.create_named([f"a{i}" for i in range(n)], deadline)
            icpt = spaces.create_named([f"i{i}" for i in range(n)], deadline)
            setup_sandboxes(icpt, deadline)
            held.upstream = Upstream(world.inet, UPSTREAM, {POOL_NAME: POOL}, TTL)
            records = ([sandbox_doc(f"a{i}", ns, 1, ADDRESS_POLICY) for i, ns in enumerate(bare)],
                       [sandbox_doc(f"i{i}", ns, 1, NAMES_POLICY) for i, ns in enumerate(icpt)])  # fmt: skip
            mem = results["memory"] = {}
            held.agent = memory_phase(
                Path(tmp), world.router, records, args.memory_repeats, AGENT_CONFIG, deadline, mem
            )
            results["checks"] = {
                "address_only_not_intercepted": all(a == 0 for a, _ in mem["intercepted_counts"]),
                "every_named_sandbox_intercepted": all(i == n for _, i in mem["intercepted_counts"]),
            }
            load(held, world.router, icpt, args, deadline, results)
            restart(held.agent, world.sandboxes[0], [r["id"] for r in records[1]], deadline, results)
        finally:
            held.close()
            failed = spaces.delete()
            if failed:
                results["cleanup_failures"] = failed
    return results


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result: per load, the highest rate with p99 <= 20 ms and every query
    answered through interception against the same load straight to the upstream; memory and descriptors
    per intercepted sandbox; the restart's longest stretch without an answer."""
    n = results.get("settings", {}).get("sandboxes", "?")
    n = f"{n:,}" if isinstance(n, int) else n
    out = []
    for phase, label in PHASE_LABEL.items():
        best = results.get("phases", {}).get(phase, {}).get("best_rate", {})
        out.append(Figure("intercept_scale", f"queries/s, {n} intercepted sandboxes, {label}", "queries/s",
                          best.get("intercepted"), best.get("direct"), BASE_NAME, GOAL, lower_is_better=False,
                          note="highest step with p99 within the goal and all answered"))  # fmt: skip
    per = results.get("memory", {}).get("per_sandbox", {})
    rss = per.get("rss_kib")
    out.append(Figure("intercept_scale", "agent RSS per intercepted sandbox", "KiB", rss,
                      note=f"({n} intercepted - {n} address-only) / {n}"))  # fmt: skip
    out.append(Figure("intercept_scale", "agent descriptors per intercepted sandbox", "fds", per.get("fds"),
                      note=f"({n} intercepted - {n} address-only) / {n}"))  # fmt: skip
    gap = results.get("restart", {}).get("gap", {})
    out.append(Figure("intercept_scale", "restart: longest stretch without a DNS answer", "s",
                      gap.get("longest_without_answer_s"),
                      note=f"{gap.get('unanswered', '?')} of {gap.get('queries', '?')} queries unanswered"
                      f" (one every 10 ms, 50 ms each)"))  # fmt: skip
    return out


def report(results: dict[str, Any]) -> None:
    """The module's own table: every step of both loads, then memory and the restart."""
    print(f"{'load':<9}{'way':<13}{'rate/s':>7}{'sent':>7}{'answered':>10}{'p50 ms':>8}{'p99 ms':>8}"
          f"{'max ms':>8}{'lag p99':>8}{'writes/q':>9}  CPUs agent/upstream/generator/others")  # fmt: skip
    for phase, doc in results["phases"].items():
        for way in WAYS:
            for row in doc["steps"][way]:
                keys = ("agent", "upstream", "generator", "others")
                cpu = "/".join(f"{row['cpu_cores'].get(k, 0.0):.2f}" for k in keys)
                mark = "" if row["ok"] else "  over"
                mark += ", noisy: repeated" if row.get("superseded") else ""
                print(f"{phase:<9}{way:<13}{row['rate']:>7g}{row['sent']:>7}{row['answered']:>10}"
                      f"{_f(row['p50_ms']):>8}{_f(row['p99_ms']):>8}{_f(row['max_ms']):>8}"
                      f"{_f(row['lag_p99_ms']):>8}{_f(row['writes_per_query']):>9}  {cpu}{mark}")  # fmt: skip
        best, failed = doc["best_rate"], doc["first_failed_rate"]
        ways = [f"{w} {_f(best[w], 0)}/s (first failed: {_f(failed[w], 0)})" for w in WAYS[::-1]]
        print(f"  {phase}: highest rate with p99 <= {GOAL_P99_MS:g} ms and all answered: {', '.join(ways)}")
    mem = results["memory"]
    for k, p in enumerate(mem["pairs"]):
        plain, named = p["address_only"], p["intercepted"]
        print(f"memory, pair {k + 1}: address-only {plain['vmrss_kib'] / 1024:.1f} MiB, {plain['fds']} fds;"
              f" intercepted {named['vmrss_kib'] / 1024:.1f} MiB, {named['fds']} fds; per intercepted sandbox"
              f" {p['rss_kib_per_sandbox']:+.1f} KiB, {p['fds_per_sandbox']:+.2f} fds")  # fmt: skip
    per, after = mem["per_sandbox"], mem.get("intercepted_after_load")
    print(f"  per intercepted sandbox (median of pairs): {per['rss_kib']:+.1f} KiB RSS, {per['fds']:.2f} fds")
    if after:
        print(f"  intercepted after the load: {after['vmrss_kib'] / 1024:.1f} MiB, {after['fds']} fds")
    r = results["restart"]
    gap, t = r["gap"], r["times_s"]
    print(
        f"restart ({r['sandboxes']} sandboxes): longest without an answer"
        f" {_f(gap['longest_without_answer_s'], 3)} s, {gap['unanswered']} of {gap['queries']} queries"
        f" unanswered; after SIGTERM: exited"
        f" {t['exited']:.2f} s, READY {t['ready']:.2f} s, all enforced {t['all_enforced']:.2f} s;"
        f" learned kept {r['learned_kept']}, TCP to them open while down {r['tcp_open_while_down']}"
    )
    print(f"checks: {results['checks']}; wall time {results['wall_s']:.1f} s")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.intercept_scale", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=1000, help="intercepted sandboxes (and as many not)")
    p.add_argument("--rates", type=float, nargs="+", default=[250, 500, 750, 1000, 1500, 2000, 3000, 4000],
                   help="offered queries per second, one step each, in this order")  # fmt: skip
    p.add_argument("--step-seconds", type=float, default=3.0, help="sending time of each step")
    p.add_argument("--timeout", type=float, default=1.0, help="a reply later than this is unanswered")
    p.add_argument("--warmup", type=int, default=10, help="queries per sandbox before the ramps")
    p.add_argument("--warmup-rate", type=float, default=1000.0, help="queries/s of the warm-up")
    p.add_argument("--sample", type=int, default=50, help="sandboxes whose kernel commits are counted")
    p.add_argument("--memory-repeats", type=int, default=2, help="pairs of starts for the memory figure")
    p.add_argument("--max-seconds", type=float, default=480.0)
    p.add_argument("--json", type=Path, metavar="OUT", help=f"default {DEFAULT_OUT} (none with --smoke)")
    p.add_argument("--smoke", action="store_true", help="20 sandboxes, rates 100 and 200/s, 1 s steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.rates, args.step_seconds = 20, [100.0, 200.0], 1.0
        args.warmup, args.sample, args.memory_repeats = 5, 5, 1
    elif args.json is None:
        args.json = DEFAULT_OUT
    counts = (args.sandboxes, args.warmup, args.sample, args.memory_repeats)
    if min(counts) < 1 or min(args.rates) <= 0 or min(args.timeout, args.step_seconds, args.warmup_rate) <= 0:
        p.error("sizes, counts, rates and times must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed and every check held; 1 when a check failed; 2 when it could not run or
    was aborted (SIGTERM, --max-seconds): what was measured until then is still written. The goal is
    reported, never enforced."""
    args = parse_args(argv)
    if not began("intercept_scale"):
        return 2
    t0 = time.monotonic()
    results: dict[str, Any] = {
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    }
    try:
        run(args, results)
    except (KeyboardInterrupt, Exception) as e:  # noqa: BLE001 - reported, with what was measured until then
        results["error"] = f"{type(e).__name__}: {e}"
        print(f"bench.intercept_scale: aborted: {results['error']}", file=sys.stderr)
    results["wall_s"] = time.monotonic() - t0
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if "error" in results:
        return 2
    report(results)
    return 0 if all(results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
