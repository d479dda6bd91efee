"""DNS benchmark: 1,000 sandboxes sharing 100 names, plus 10,000 distinct names, against a real dnsmasq.

Measures, in one run: the queries per second that reach the resolver against names / TTL (the floor any
design that refreshes every name once per TTL must pay), the time from a changed answer to enforcement in
every sandbox that names it, and the agent's memory. The agent runs in the throwaway world's router
namespace and resolves through the world's DNS server. Run as root from the project root:
`python -m bench.dns [--smoke]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from bench.apply import Aborted, Deadline, began, machine_info
from bench.figures import Figure
from egressd.agent.control import ControlError
from egressd.desired.query import ENGINE_ENV
from egressd.kernel.nft import LibnftBackend
from egressd.ruleset.transactions import set_elements
from netns_fixtures import DnsServer, World, cleanup
from tests.integration.agent import AgentProcess

DNS4 = "198.51.100.53"
QUERY_TOLERANCE = 0.10  # queries/s within 10 % of names / TTL
RSS_GOAL_MB = 150.0  # decimal MB, at 1,000 sandboxes and 10,000 hostnames


def addresses_for(i: int) -> tuple[str, str]:
    """A distinct benchmarking/documentation address pair per name index (up to 65,536 names)."""
    return f"198.18.{(i >> 8) & 0xFF}.{i & 0xFF}", f"2001:db8:d::{i:x}"


def records(shared: int, distinct: int) -> dict[str, list[str]]:
    out = {}
    for i in range(shared + distinct):
        name = f"s{i}.bench.test" if i < shared else f"d{i}.bench.test"
        out[name] = list(addresses_for(i))
    return out


def sandbox_records(
    namespaces: list[str], shared: int, distinct: int, per_shared: int
) -> list[dict[str, Any]]:
    """Each sandbox names `per_shared` of the shared names and its own slice of the distinct ones."""
    per_distinct = distinct // len(namespaces)
    out = []
    for k, ns in enumerate(namespaces):
        names = [f"s{(k * 7 + j) % shared}.bench.test" for j in range(per_shared)]
        names += [f"d{shared + k * per_distinct + j}.bench.test" for j in range(per_distinct)]
        out.append(
            {
                "id": f"b{k}",
                "netns": f"/run/netns/{ns}",
                "revision": 1,
                "network_policy": {"allow_internet_access": False, "allow_out": names},
            }
        )
    return out


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def agent_pid(agent: AgentProcess) -> int | None:
    """`ip netns exec` execs the agent, so the Popen pid is the agent's own."""
    return agent.proc.pid if agent.proc is not None else None


def wait_all_enforced(agent: AgentProcess, count: int, deadline: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() < deadline:
        try:
            status = agent.status()  # one status a poll: at 1,000 sandboxes each one costs the agent work
        except ControlError:  # still starting: its control socket is not there yet
            time.sleep(0.02)
            continue
        if sum(1 for s in status.values() if s["state"] == "enforced") >= count:
            return time.monotonic() - t0
        time.sleep(0.1)
    raise TimeoutError(f"not all {count} sandboxes enforced in time")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of the process so far (all its threads)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.contextmanager
def namespaces(names: list[str]) -> Iterator[list[str]]:
    """Bare namespaces standing for the sandboxes, deleted (with the tables in them) on the way out."""
    subprocess.run(["ip", "-batch", "-"], input="".join(f"netns add {n}\n" for n in names), text=True,
                   check=True, timeout=120)  # fmt: skip
    try:
        yield names
    finally:
        subprocess.run(["ip", "-batch", "-"], input="".join(f"netns del {n}\n" for n in names), text=True,
                       timeout=120)  # fmt: skip


def run(args: argparse.Namespace, results: dict[str, Any]) -> dict[str, Any]:
    """Fills `results` as it goes, so an aborted run still reports what it measured. Each resolver engine
    asked for gets an agent of its own over fresh namespaces (no tables left by the one before), against
    the same dnsmasq; the figures of the last one (the lean path when both ran) are also at the top."""
    deadline = Deadline(time.monotonic() + args.max_seconds)
    prefix = f"bd{os.getpid() % 10000}"
    cleanup(prefix)
    results["machine"] = machine_info()
    engines = ["dnspython", "wire"] if args.resolver == "both" else [args.resolver]
    with World(prefix, sandboxes=0) as world, tempfile.TemporaryDirectory() as tmp:
        recs = records(args.shared, args.distinct)
        with DnsServer(world, address=DNS4, ttl=int(args.ttl), records=recs) as server:
            for k, engine in enumerate(engines):
                measured = results.setdefault("by_resolver", {}).setdefault(engine, {})
                extra = [f"{prefix}{k}n{i}" for i in range(args.sandboxes)]
                with namespaces(extra):
                    measure(args, server, world.router, Path(tmp) / engine, extra, k, deadline, measured)
                results.update(measured)
    return results


def measure(
    args: argparse.Namespace,
    server: DnsServer,
    router: str,
    workdir: Path,
    extra: list[str],
    k: int,
    deadline: Deadline,
    results: dict[str, Any],
) -> None:
    """One agent (resolver engine k of the run, workdir named after it) over the namespaces in extra."""
    engine = workdir.name
    results["resolver"] = engine
    agent = AgentProcess(
        workdir,
        netns=router,
        env={ENGINE_ENV: engine},
        extra_config=(
            f'[dns]\nnameservers = ["{DNS4}"]\nmin_ttl = {args.ttl}\nmax_ttl = {args.ttl}\n'
            f"retention = {args.ttl * 2}\ntimeout = 2\nintercept = {'true' if args.intercept else 'false'}\n"
        ),
    )
    try:
        snapshot = {
            "type": "snapshot",
            "sandboxes": sandbox_records(extra, args.shared, args.distinct, args.per_shared),
        }
        agent.send(snapshot)
        t0 = time.monotonic()
        agent.start(wait_ready=False)
        results["cold_start_all_enforced_s"] = wait_all_enforced(agent, len(extra), deadline.end)
        results["cold_start_total_s"] = time.monotonic() - t0
        steady_state(args, server, agent_pid(agent), results)
        naming = [r for r in snapshot["sandboxes"] if "s0.bench.test" in r["network_policy"]["allow_out"]]
        changed_answer(server, agent, naming, f"198.19.255.{k + 1}", deadline, results)
    finally:
        agent.stop()  # also when a check fails or the run is interrupted


def steady_state(
    args: argparse.Namespace, server: DnsServer, pid: int | None, results: dict[str, Any]
) -> None:
    """Queries per second at the server, in steady state, against names / TTL; the agent's CPU meanwhile."""
    names = args.shared + args.distinct
    time.sleep(min(args.ttl, 5))
    server.reset_counts()
    cpu0 = cpu_seconds(pid) if pid else None
    server0 = cpu_seconds(server.pid) if server.pid else None
    window = args.ttl * args.windows
    time.sleep(window)
    a_queries = server.queries(qtype="A")
    aaaa_queries = server.queries(qtype="AAAA")
    cpu1 = cpu_seconds(pid) if pid else None
    server1 = cpu_seconds(server.pid) if server.pid else None
    if server0 is not None and server1 is not None:
        results["server_cpu_share"] = (server1 - server0) / window  # dnsmasq's, of one core
    floor = names / args.ttl
    results["names"] = names
    results["window_s"] = window
    results["queries_a_per_s"] = a_queries / window
    results["queries_aaaa_per_s"] = aaaa_queries / window
    results["names_per_ttl"] = floor
    results["ratio_a_to_floor"] = (a_queries / window) / floor
    results["ratio_aaaa_to_floor"] = (aaaa_queries / window) / floor
    if cpu0 is not None and cpu1 is not None:
        results["agent_cpu_share"] = (cpu1 - cpu0) / window  # of one core
        total = a_queries + aaaa_queries
        results["agent_cpu_ms_per_query"] = (cpu1 - cpu0) * 1000 / total if total else None
    results["agent_rss_mib"] = rss_mib(pid) if pid else None


def changed_answer(
    server: DnsServer,
    agent: AgentProcess,
    naming: list[dict[str, Any]],
    new4: str,
    deadline: Deadline,
    results: dict[str, Any],
) -> None:
    """A changed answer for one shared name, until every sandbox naming it holds the new address."""
    backend = LibnftBackend()
    target = "s0.bench.test"
    t_change = time.monotonic()
    server.set(target, new4, "2001:db8:d::ffff")
    pending = {r["netns"] for r in naming}
    first_seen: float | None = None
    while pending and time.monotonic() < deadline.end:
        for path in list(pending):
            listing = backend.read(path) or []
            if new4 in set_elements(listing, ["allow_dns4"]).get("allow_dns4", frozenset()):
                pending.discard(path)
                first_seen = first_seen or time.monotonic()
        time.sleep(0.005)
    backend.close()
    done = time.monotonic()
    changed = [e for e in agent.events("dns_changed") if e.get("host") == target]
    results["change_sandboxes"] = len(naming)
    results["change_to_all_enforced_s"] = done - t_change if not pending else None
    results["change_first_to_last_sandbox_s"] = (done - first_seen) if first_seen and not pending else None
    results["change_log_events"] = len(changed)


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: queries at the resolver against the floor
    names / TTL (ratio = queries / floor, goal within 10 %), the changed answer, cold start and agent RSS."""
    st = results.get("settings", {})
    ttl = st.get("ttl")
    floor = results.get("names_per_ttl")
    floor_name = f"names / TTL ({results.get('names', '?')} names / {ttl:g} s)" if ttl else "names / TTL"
    a, aaaa = results.get("queries_a_per_s"), results.get("queries_aaaa_per_s")

    def within(q: float | None) -> bool | None:
        if q is None or not floor:
            return None
        return abs(q / floor - 1) <= QUERY_TOLERANCE

    world = f"{st.get('sandboxes', '?')} sandboxes, {results.get('names', '?')} names"
    by_resolver = results.get("by_resolver", {})
    old = by_resolver.get("dnspython", {}) if len(by_resolver) > 1 else {}  # the baseline, when both ran
    rss = results.get("agent_rss_mib")
    rss_mb = None if rss is None else rss * 1024 * 1024 / 1e6
    # Queries are a cost, but the ratio reads queries / floor (1.04: 4 % above it), as the module prints it.
    return [
        Figure("dns", f"A queries/s at the resolver, {world}", "queries/s", a, floor, floor_name,
               f"within {QUERY_TOLERANCE:.0%} of floor", within(a), lower_is_better=False,
               note=f"over {results.get('window_s', '?')} s in steady state; ratio = queries / floor"),
        Figure("dns", f"AAAA queries/s at the resolver, {world}", "queries/s", aaaa, floor, floor_name,
               lower_is_better=False, note="ratio = queries / floor"),
        Figure("dns", f"changed answer -> all {results.get('change_sandboxes', '?')} naming it", "s",
               results.get("change_to_all_enforced_s"),
               note=f"includes the wait for the refresh, up to one TTL ({ttl} s)"),
        Figure("dns", f"cold start, {world}: all enforced", "s", results.get("cold_start_all_enforced_s")),
        Figure("dns", f"agent RSS, {world}", "MB", rss_mb, goal=f"< {RSS_GOAL_MB:g} MB",
               met=None if rss_mb is None else rss_mb < RSS_GOAL_MB, note="decimal MB (VmRSS)"),
        Figure("dns", f"agent CPU per query, {world}", "ms", results.get("agent_cpu_ms_per_query"),
               old.get("agent_cpu_ms_per_query"), "dnspython's resolver, same run" if old else None,
               note=f"agent CPU in steady state / A + AAAA queries ({results.get('resolver', 'wire')})"),
    ]  # fmt: skip


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.dns", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=1000)
    p.add_argument("--shared", type=int, default=100, help="names shared by many sandboxes")
    p.add_argument("--distinct", type=int, default=10_000, help="names each named by one sandbox")
    p.add_argument("--per-shared", type=int, default=10, help="shared names per sandbox")
    p.add_argument("--ttl", type=float, default=10.0, help="the server's TTL (and min/max_ttl)")
    p.add_argument("--windows", type=int, default=3, help="TTLs over which queries are counted")
    p.add_argument("--max-seconds", type=float, default=600.0)
    p.add_argument("--json", type=Path, metavar="OUT")
    p.add_argument(
        "--resolver",
        choices=("wire", "dnspython", "both"),
        default="wire",
        help="the agent's query path: the lean one (wire), the old one (dnspython), or both in turn",
    )
    p.add_argument(
        "--no-intercept",
        dest="intercept",
        action="store_false",
        help="[dns] intercept = false: no DNS proxy per sandbox (what the agent holds without them)",
    )
    p.add_argument("--smoke", action="store_true", help="20 sandboxes, 10 + 100 names, TTL 2 s")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.shared, args.distinct, args.per_shared, args.ttl, args.windows = (
            20,
            10,
            100,
            3,
            2.0,
            2,
        )
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed, 1 when the changed answer never reached every sandbox, 2 when it could not
    run or was aborted (SIGTERM, --max-seconds): the figures measured until then are still written."""
    args = parse_args(argv)
    if not began("dns"):
        return 2
    t0 = time.monotonic()
    partial: dict[str, Any] = {"settings": vars(args).copy()}
    try:
        results = run(args, partial)
    except (TimeoutError, KeyboardInterrupt, Aborted) as e:
        partial["error"] = f"{type(e).__name__}: {e}"
        partial["wall_s"] = time.monotonic() - t0
        print(f"bench.dns: aborted: {partial['error']}", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(partial, indent=2, default=str))
        return 2
    results["wall_s"] = time.monotonic() - t0
    for engine, measured in results["by_resolver"].items():
        print(f"resolver: {engine}")
        print_table(measured, args.ttl)
    print(f"wall time {results['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    ok = all(m.get("change_to_all_enforced_s") is not None for m in results["by_resolver"].values())
    return 0 if ok else 1


def print_table(r: dict[str, Any], ttl: float) -> None:
    def fmt(key: str, unit: str = "", digits: int = 2) -> str:
        value = r.get(key)
        return "-" if value is None else f"{value:.{digits}f}{unit}"

    rows = [
        ("names (shared + distinct)", str(r.get("names", "-")), ""),
        ("cold start, all sandboxes enforced", fmt("cold_start_all_enforced_s", " s"), ""),
        ("A queries/s at the resolver", fmt("queries_a_per_s", "", 1),
         f"floor names/TTL = {fmt('names_per_ttl', '', 1)}"),
        ("  ratio to the floor", fmt("ratio_a_to_floor", "", 3), "goal: within 10 %"),
        ("AAAA queries/s", fmt("queries_aaaa_per_s", "", 1), f"ratio {fmt('ratio_aaaa_to_floor', '', 3)}"),
        ("agent CPU per query (A + AAAA)", fmt("agent_cpu_ms_per_query", " ms", 3),
         f"agent busy {fmt('agent_cpu_share', '', 2)} of a core, dnsmasq {fmt('server_cpu_share', '', 2)}"),
        ("changed answer -> every sandbox naming it", fmt("change_to_all_enforced_s", " s"),
         f"{r.get('change_sandboxes')} sandboxes; includes the wait for the refresh (TTL {ttl:g} s)"),
        ("  first -> last of them updated", fmt("change_first_to_last_sandbox_s", " s", 3), ""),
        ("agent RSS", fmt("agent_rss_mib", " MiB", 1), ""),
    ]  # fmt: skip
    width = max(len(row[0]) for row in rows)
    for name, value, note in rows:
        print(f"  {name:<{width}}  {value:>12}  {note}")


if __name__ == "__main__":
    sys.exit(main())
