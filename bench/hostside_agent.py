"""Host-side agent benchmark: cold start and restart of N sandboxes that all name `host_interface`.

Issue 19's goal: with 1,000 sandboxes that all name `host_interface`, a cold start takes at most 3x the cold
start of the same sandboxes without it, and a restart adopts them all with zero writes in about a second.
`egressd run` runs inside a throwaway "host" namespace H (never the machine's own), which holds one veth end
h<i> per sandbox; the other end is eth0 in the sandbox's namespace. Both variants (the same records without
and with `host_interface`) run in one run, each from empty tables and a fresh state dir, which goes first
alternating per repeat. Run as root from the project root: `python -m bench.hostside_agent`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import agent as ba
from bench.apply import NETNS_DIR, Aborted, Deadline, Row, began, machine_info, run
from bench.figures import Figure
from egressd.agent.control import ControlError
from egressd.feed.lines import DEFAULT_MAX_LINE
from egressd.kernel.hostside import FAMILY as HOST_FAMILY
from egressd.kernel.hostside import GUARD_TABLE, TABLE_PREFIX, table_name
from egressd.kernel.netns import ContextCache, in_netns
from egressd.kernel.nfnl import NFT_MSG_GETTABLE, NFTA_TABLE_NAME, attributes, netfilter_socket
from egressd.kernel.nfnl_batch import BatchSocket
from egressd.kernel.nfnl_listing import ListingSocket
from egressd.model.config import Config, load_config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.render import FINGERPRINT_CHAIN, render
from egressd.ruleset.transactions import fingerprint_of
from tests.integration.agent import AgentProcess

RATIO_GOAL = 3.0  # cold start with host_interface / without, at most
RESTART_GOAL_S = ba.RESTART_GOAL_S  # the restart goal of bench.agent: "in about a second"
VARIANTS = ("plain", "host")  # records without / with host_interface
LABELS = {"plain": "no host_interface", "host": "with host_interface"}
NFTA_TABLE_HANDLE = 4  # linux/netfilter/nf_tables.h: a u64, big-endian
LINK_BATCH = 250  # veth pairs per `ip -batch`: each batch well inside one command's time bound


# --- the world: H, its links, the two variants of the records -------------------------------------------


def make_links(host: str, sandboxes: Sequence[str], deadline: Deadline) -> None:
    """One veth pair per sandbox: h<i> in H, eth0 in the sandbox's namespace; no addresses, no traffic."""
    for start in range(0, len(sandboxes), LINK_BATCH):
        chunk = range(start, min(start + LINK_BATCH, len(sandboxes)))
        script = "".join(f"link add h{i} type veth peer name eth0 netns {sandboxes[i]}\n" for i in chunk)
        run(["ip", "-n", host, "-batch", "-"], deadline, "veth setup", stdin=script)


@dataclass(frozen=True)
class Variant:
    name: str
    world: ba.ColdWorld
    host_fps: dict[str, str]  # host-side table name -> the fingerprint it must carry (none: plain)


def make_variants(names: Sequence[str], config: Config) -> dict[str, Variant]:
    """The same records twice: as bench.agent's cold start has them, and each naming its h<i>."""
    plain = ba.make_cold_world(names, config)
    records = [{**r, "host_interface": f"h{i}"} for i, r in enumerate(plain.records)]
    snapshot = {"type": "snapshot", "sandboxes": records}
    fits = len(json.dumps(snapshot)) < DEFAULT_MAX_LINE - 1024
    host = ba.ColdWorld(plain.names, records, plain.rulesets, snapshot if fits else None)
    fps = {
        table_name(r["host_interface"]): render(parse_sandbox(r).policy, config, host=True).fingerprint
        for r in records
    }
    return {"plain": Variant("plain", plain, {}), "host": Variant("host", host, fps)}


# --- H, as this process sees it -------------------------------------------------------------------------


class HostView:
    """H through this process's own sockets made there, not the agent's: a raw netlink socket (table dumps
    and the ruleset generation, which every commit bumps) and a libnftables context (each host-side table's
    fingerprint chain). `nft list tables` or `list ruleset` load every table: over a minute at 1,000."""

    def __init__(self, host: str) -> None:
        self.name, self.path = host, str(NETNS_DIR / host)
        self._sock = in_netns(self.path, netfilter_socket)[0]
        self._listing = ListingSocket(self._sock)
        self._contexts = ContextCache(ba._nft_with_handles)

    def generation(self) -> int:
        return self._listing.generation()

    def tables(self) -> dict[tuple[str, str], int]:
        """(family, name) -> handle of every egressd table in H: the host-side ones and the guard."""
        out = {}
        for family in (HOST_FAMILY, "inet"):
            for body in self._listing.get(NFT_MSG_GETTABLE, family) or []:
                a = attributes(body, (NFTA_TABLE_NAME, NFTA_TABLE_HANDLE))
                name = bytes(a[NFTA_TABLE_NAME]).rstrip(b"\0").decode()
                if name.startswith(TABLE_PREFIX):
                    out[(family, name)] = struct.unpack("!Q", a[NFTA_TABLE_HANDLE])[0]
        return out

    def fingerprint(self, name: str) -> str | None:
        nft, _ = self._contexts.get(self.path)
        rc, out, err = nft.cmd(f"list chain {HOST_FAMILY} {name} {FINGERPRINT_CHAIN}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise RuntimeError(f"list the fingerprint of {name} in H: {err.strip()}")
        return fingerprint_of(json.loads(out)["nftables"])

    def clean(self) -> None:
        """Every egressd table in H (host-side and guard) deleted in one raw transaction, and checked."""
        tables = self.tables()
        if tables:
            batch = BatchSocket.open(self.path)
            try:
                batch.run([{"delete": {"table": {"family": f, "name": n}}} for f, n in tables], "clean-up")
            finally:
                batch.close()
        if left := self.tables():
            raise RuntimeError(f"{len(left)} egressd tables still in H after delete, e.g. {next(iter(left))}")

    def close(self) -> None:
        self._contexts.close()
        self._sock.close()


def check_host(v: Variant, hv: HostView, who: str, deadline: Deadline) -> dict[tuple[str, str], int]:
    """H holds exactly the host-side tables the variant names, each carrying its fingerprint (and the guard
    table when there are any); returns every egressd table in H with its handle."""
    tables = hv.tables()
    found = {name for family, name in tables if family == HOST_FAMILY}
    if found != v.host_fps.keys():
        missing, extra = v.host_fps.keys() - found, found - v.host_fps.keys()
        raise RuntimeError(
            f"after {who} ({v.name}): {len(found)} host-side tables in H, expected {len(v.host_fps)} "
            f"({len(missing)} missing, {len(extra)} not named by any record)"
        )
    for name, fp in v.host_fps.items():
        deadline.check("host-side verification")
        if (got := hv.fingerprint(name)) != fp:
            raise RuntimeError(f"after {who}: host-side table {name} carries fingerprint {got!r}, not {fp}")
    if v.host_fps and ("inet", GUARD_TABLE) not in tables:
        raise RuntimeError(f"after {who}: no guard table inet {GUARD_TABLE} in H")
    return tables


# --- one variant: cold start, SIGKILL, restart -------------------------------------------------------------


@dataclass
class VariantRun:
    """One cold start + SIGKILL + restart of one variant at N sandboxes."""

    variant: str
    repeat: int
    first: bool  # went first in its repeat
    cold_s: float | None = None
    cold_ready_s: float | None = None
    cold_writes: int | None = None
    cold_proc: dict[str, int] = field(default_factory=dict)
    cold_log: dict[str, float] = field(default_factory=dict)
    host_tables: int | None = None
    restart_s: float | None = None
    restart_ready_s: float | None = None
    restart_writes: int | None = None
    restart_rows_written: int | None = None
    restart_proc: dict[str, int] = field(default_factory=dict)
    restart_log: dict[str, float] = field(default_factory=dict)
    handles_checked: int = 0
    handles_changed: int | None = None
    host_checked: int = 0
    host_changed: int | None = None  # egressd tables in H whose handle changed (or that came or went)
    host_commits: int | None = None  # commits in H during the restart (its ruleset generation's growth)
    verified: bool = False


def log_split(agent: AgentProcess) -> dict[str, float]:
    """From this start's own log (rotated before it; ms timestamps): s from `started` (state and feed read)
    to its last per-sandbox event before `ready`, and to `ready` (which waits for the host-side prune too)."""
    events = agent.logs()

    def at(e: dict[str, Any]) -> float:
        return datetime.strptime(e["ts"], "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()

    started = next(at(e) for e in events if e.get("event") == "started")
    ready = next(at(e) for e in events if e.get("event") == "ready")
    last = max((at(e) for e in events if "sandbox" in e and at(e) <= ready), default=started)
    return {"last_sandbox_s": last - started, "ready_s": ready - started}


def bench_variant(
    rep: VariantRun, v: Variant, workdir: Path, hv: HostView, view: ba.KernelView, deadline: Deadline
) -> None:
    """From empty tables and a fresh state dir: cold start, checked in the kernel, SIGKILL, restart."""
    ba.clean_tables(view, v.world, deadline)
    hv.clean()
    agent = AgentProcess(workdir, resync_interval=ba.RESYNC_S, netns=hv.name)
    try:
        ba.write_feed(agent, v.world)
        where = f"cold start ({v.name})"
        rep.cold_ready_s, rep.cold_s, rows = ba.start_agent(agent, v.world, deadline, where)
        assert agent.proc is not None
        rep.cold_proc = ba.proc_figures(agent.proc.pid)  # `ip netns exec` execs: the pid is the agent's
        rep.cold_writes = sum(r["writes"] for r in rows if r["id"] in v.world.expected)
        rep.cold_log = log_split(agent)
        ba.check_fingerprints(view, v.world, where, deadline)
        agent.kill()  # SIGKILL: the tables stay, and the next process must adopt them
        tables = check_host(v, hv, where, deadline)  # after the kill: what the restart finds
        rep.host_tables = sum(1 for family, _ in tables if family == HOST_FAMILY)
        before = (ba.handles(view, v.world, deadline), tables, hv.generation())
        bench_restart(rep, v, agent, hv, view, deadline, before)
        rep.verified = True
    finally:
        agent.stop()


def bench_restart(
    rep: VariantRun,
    v: Variant,
    agent: AgentProcess,
    hv: HostView,
    view: ba.KernelView,
    deadline: Deadline,
    before: tuple[dict[str, int | None], dict[tuple[str, str], int], int],
) -> None:
    """Restart until all are enforced; then nothing may have changed: writes, table handles, H's ruleset
    generation (no commit at all there)."""
    rep.restart_ready_s, rep.restart_s, rows = ba.start_agent(agent, v.world, deadline, f"restart ({v.name})")
    assert agent.proc is not None
    rep.restart_proc = ba.proc_figures(agent.proc.pid)
    rep.restart_log = log_split(agent)
    mine = [r for r in rows if r["id"] in v.world.expected]
    rep.restart_writes = sum(r["writes"] for r in mine)
    rep.restart_rows_written = sum(1 for r in mine if r["writes"])
    sandbox_before, host_before, generation = before
    rep.host_commits = hv.generation() - generation
    after = ba.handles(view, v.world, deadline)
    rep.handles_checked = len(after)
    rep.handles_changed = sum(1 for p in after if after[p] is None or after[p] != sandbox_before[p])
    ba.check_fingerprints(view, v.world, "restart", deadline)
    host_after = check_host(v, hv, "restart", deadline)
    rep.host_checked = len(host_before)
    rep.host_changed = sum(
        1 for k in host_before.keys() | host_after.keys() if host_before.get(k) != host_after.get(k)
    )


# --- reporting -----------------------------------------------------------------------------------------


def med(runs: Sequence[VariantRun], variant: str, attr: str) -> float | None:
    return ba._med([getattr(r, attr) for r in runs if r.variant == variant])


def rss_mib(runs: Sequence[VariantRun], variant: str, phase: str) -> float | None:
    kib = ba._med([getattr(r, f"{phase}_proc").get("vmrss_kib") for r in runs if r.variant == variant])
    return None if kib is None else kib / 1024


def cold_ratio(runs: Sequence[VariantRun]) -> float | None:
    plain, host = med(runs, "plain", "cold_s"), med(runs, "host", "cold_s")
    return None if not plain or host is None else host / plain


def restart_totals(runs: Sequence[VariantRun]) -> dict[str, int | None]:
    """Sums over every restart that got that far, both variants: each must be 0."""
    done = [r for r in runs if r.restart_writes is not None]
    checked = [r for r in runs if r.host_changed is not None]
    return {
        "writes": sum(r.restart_writes or 0 for r in done) if done else None,
        "handles_changed": sum(r.handles_changed or 0 for r in checked) if checked else None,
        "handles_seen": sum(r.handles_checked for r in checked),
        "host_changed": sum(r.host_changed or 0 for r in checked) if checked else None,
        "host_seen": sum(r.host_checked for r in checked),
        "host_commits": sum(r.host_commits or 0 for r in checked) if checked else None,
    }


def log_rows(runs: Sequence[VariantRun], variant: str, phase: str) -> list[Row]:
    """The agent's own split of a start (log_split): its reconcile of every sandbox, then the rest."""
    logs = [getattr(r, f"{phase}_log") for r in runs if r.variant == variant]
    return [
        Row(f"  agent log: started -> {label}, s", ba._med([g.get(key) for g in logs]), None)
        for key, label in (("last_sandbox_s", "last per-sandbox event"), ("ready_s", "ready"))
    ]


def zero(label: str, value: int | None) -> Row:
    return Row(label, value, None, False, "0", None if value is None else value == 0)


def rows_for(runs: Sequence[VariantRun], n: int) -> list[Row]:
    m = f"median of {sum(r.variant == 'host' for r in runs)}"
    ratio, restart, tot = cold_ratio(runs), med(runs, "host", "restart_s"), restart_totals(runs)
    host_tables = [r.host_tables for r in runs if r.variant == "host" and r.host_tables is not None]
    least = min(host_tables) if host_tables else None
    rows: list[Row] = []
    add = rows.append
    for v in VARIANTS:
        add(Row(f"cold start N={n} {LABELS[v]}, s ({m})", med(runs, v, "cold_s"), None))
        add(Row("  start -> ready logged, s", med(runs, v, "cold_ready_s"), None))
        rows += log_rows(runs, v, "cold")
        add(Row("  rule writes (status)", med(runs, v, "cold_writes"), None))
    met = None if ratio is None else ratio <= RATIO_GOAL
    add(Row("cold start with / without host_interface", ratio, None, False, f"<={RATIO_GOAL:g}x", met))
    met = None if least is None else least == n
    add(Row("cold start: host-side tables in H (least of the repeats)", least, None, False, str(n), met))
    for v in VARIANTS:
        goal, met = "", None
        if v == "host" and restart is not None:
            goal, met = f"<{RESTART_GOAL_S:g} s", restart < RESTART_GOAL_S
        add(Row(f"restart N={n} {LABELS[v]}, s ({m})", med(runs, v, "restart_s"), None, False, goal, met))
        add(Row("  start -> ready logged, s", med(runs, v, "restart_ready_s"), None))
        rows += log_rows(runs, v, "restart")
    add(zero("restart: rule writes (status, all restarts)", tot["writes"]))
    add(zero(f"restart: sandbox table handles changed ({tot['handles_seen']} seen)", tot["handles_changed"]))
    add(zero(f"restart: egressd table handles in H changed ({tot['host_seen']} seen)", tot["host_changed"]))
    add(zero("restart: commits in H (its ruleset generation, all restarts)", tot["host_commits"]))
    for v in VARIANTS:
        for phase in ("cold", "restart"):
            add(Row(f"agent RSS MiB after {phase}, {LABELS[v]}", rss_mib(runs, v, phase), None))
    return rows


def to_json(
    args: argparse.Namespace,
    info: dict[str, Any],
    runs: Sequence[VariantRun],
    rows: Sequence[Row],
    wall: float,
    aborted: str | None,
    errors: Sequence[str],
) -> dict[str, Any]:
    host_runs = [r for r in runs if r.variant == "host"]
    cold = {(r.variant, r.repeat): r.cold_s for r in runs if r.cold_s}
    pairs = [(cold[("plain", k)], s) for (v, k), s in cold.items() if v == "host" and ("plain", k) in cold]
    tot = restart_totals(runs)
    done = [r for r in runs if r.verified]
    return {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goals": {"cold_ratio": RATIO_GOAL, "restart_s": RESTART_GOAL_S},
        "wall_seconds": wall,
        "aborted": aborted,
        "errors": list(errors),
        "cold_s": {v: med(runs, v, "cold_s") for v in VARIANTS},
        "restart_s": {v: med(runs, v, "restart_s") for v in VARIANTS},
        "rss_mib": {v: {p: rss_mib(runs, v, p) for p in ("cold", "restart")} for v in VARIANTS},
        "cold_ratio": cold_ratio(runs),
        "cold_ratio_per_repeat": [h / p for p, h in pairs],
        "host_verified": bool(host_runs) and all(r.verified for r in host_runs),
        "restart": {
            "runs_verified": len(done),
            "zero_writes": bool(done) and tot["writes"] == 0,
            "handles_unchanged": bool(done) and tot["handles_changed"] == 0,
            "host_tables_unchanged": bool(done) and tot["host_changed"] == 0 and tot["host_commits"] == 0,
            **tot,
        },
        "runs": [asdict(r) for r in runs],
        "table": [asdict(r) for r in rows],
    }


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: the cold start with host_interface
    against the same records without it (same run), the restart's time and its writes."""
    n = results.get("settings", {}).get("sandboxes", 0)
    cold, restart = results.get("cold_s", {}), results.get("restart_s", {})
    ratio, writes = results.get("cold_ratio"), results.get("restart", {}).get("writes")
    changed, commits = (results.get("restart", {}).get(k) for k in ("host_changed", "host_commits"))
    reps = sum(1 for r in results.get("runs", []) if r.get("variant") == "host")
    note = f"median of {reps} repeats"
    base = "the same records without host_interface, same run"
    restart_s = restart.get("host")
    return [
        Figure("hostside_agent", f"cold start, {n:,} sandboxes with host_interface", "s", cold.get("host"),
               cold.get("plain"), base, f"<= {RATIO_GOAL:g}x the baseline",
               None if ratio is None else ratio <= RATIO_GOAL, note=note),
        Figure("hostside_agent", f"restart adopting {n:,} sandboxes with host_interface", "s", restart_s,
               goal=f"< {RESTART_GOAL_S:g} s", met=None if restart_s is None else restart_s < RESTART_GOAL_S,
               note=note),
        Figure("hostside_agent", "restart with host_interface: rule writes, all repeats", "writes", writes,
               goal="0", met=None if writes is None else writes == 0,
               note=None if changed is None else f"H: {changed} handles changed, {commits} commits"),
    ]  # fmt: skip


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.hostside_agent", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=1000, metavar="N", help="sandboxes (1000)")
    p.add_argument("--repeats", type=int, default=3, metavar="R", help="repeats of both variants (3)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (default 600)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write all figures and machine info here")
    p.add_argument("--smoke", action="store_true", help="N=20, R=1: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.repeats = 20, 1
    if args.sandboxes < 1 or args.repeats < 1 or args.max_seconds <= 0:
        p.error("--sandboxes, --repeats and --max-seconds must be positive")
    return args


def measure(
    args: argparse.Namespace,
    info: dict[str, Any],
    namespaces: ba.BatchNamespaces,
    deadline: Deadline,
    runs: list[VariantRun],
    errors: list[str],
) -> None:
    """Setup, then R repeats of both variants, into `runs`; a failed variant is recorded in `errors` and the
    next one still runs (an abort keeps what was measured so far)."""
    with contextlib.ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="egressd-bench-hostside-agent-"))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        info["workdir_fs"] = ba.workdir_fs(work)
        host = namespaces.create_named(["host"], deadline)[0]
        names = namespaces.create_named([f"c{i}" for i in range(args.sandboxes)], deadline)
        make_links(host, names, deadline)
        config_of = AgentProcess(work / "config", resync_interval=ba.RESYNC_S, netns=host).config_path
        variants = make_variants(names, load_config(str(config_of), {}))  # rendered as the agents render
        view = ba.KernelView(cache=False)
        stack.callback(view.close)
        hv = HostView(host)
        stack.callback(hv.close)
        for r in range(args.repeats):
            for i, name in enumerate(VARIANTS if r % 2 == 0 else VARIANTS[::-1]):  # alternately first
                runs.append(VariantRun(name, r, i == 0))
                with ba.phase_errors(errors, f"repeat {r + 1} ({name})"):
                    bench_variant(runs[-1], variants[name], work / f"r{r}-{name}", hv, view, deadline)


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed (goals are reported, not enforced); 1 when a check failed; 2 when it could
    not run or was aborted."""
    args = parse_args(argv)
    if not began("hostside_agent"):
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    info = machine_info()
    note = ba.ensure_fd_limit(args.sandboxes)
    runs: list[VariantRun] = []
    errors: list[str] = []
    aborted: str | None = None
    namespaces = ba.BatchNamespaces()
    try:
        measure(args, info, namespaces, deadline, runs, errors)
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError, ControlError) as e:  # setup: namespaces, links, work dir
        errors.append(f"setup: {type(e).__name__}: {e}")
    finally:
        for line in namespaces.delete():
            print(f"bench.hostside_agent: could not delete namespace {line}", file=sys.stderr)
    wall = time.monotonic() - started
    rows = rows_for(runs, args.sandboxes)
    print(
        f"egressd host-side agent benchmark: cold start and restart = s from spawning `egressd run` (in a "
        f"throwaway host namespace holding {args.sandboxes} veth ends) until status shows all "
        f"{args.sandboxes} enforced; the same records without and with host_interface, alternately first; "
        f"medians over repeats"
    )
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}, "
        f"state dir on {info.get('workdir_fs', '?')}" + (f"; {note}" if note else "")
    )
    print()
    print(ba.table(rows))
    print()
    for e in errors:
        print(f"FAILED {e}")
    status = f"ABORTED: {aborted}" if aborted else (f"{len(errors)} FAILED" if errors else "complete")
    print(f"wall time {wall:.1f} s ({status}); runs verified: {sum(r.verified for r in runs)}/{len(runs)}")
    if args.json:
        doc = to_json(args, info, runs, rows, wall, aborted, errors)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
