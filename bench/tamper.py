"""Tamper benchmark: how soon a table changed inside a sandbox is put back, with the change monitor and with
the periodic resync alone, and what watching every sandbox costs the agent.

Two agents in one run, on the same N throwaway namespaces, each started from empty tables:
- "monitor": `watch_changes = true`, `resync_interval = 3600` (so every repair comes from an event);
- "resync": `watch_changes = false`, `resync_interval = S` (the default 30 s): what egressd did before.
This process tampers with T of the tables, as a tenant with CAP_NET_ADMIN would (delete the table, insert
an `accept` rule at the top of the output chain, delete an element of an allow set, in turn), and times
each repair from the kernel's own commit notifications. Run as root from the project root:
`python -m bench.tamper` (see bench/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import selectors
import shutil
import socket
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.agent import (
    BatchNamespaces,
    ColdWorld,
    KernelView,
    _nft_with_handles,
    clean_tables,
    make_cold_world,
    percentile,
    proc_figures,
    start_agent,
    status_rows,
    write_feed,
)
from bench.apply import Aborted, Deadline, began, machine_info
from bench.figures import Figure
from egressd.agent.control import ControlError
from egressd.kernel.monitor import ChangeMonitor
from egressd.kernel.monitor_events import TransactionParser
from egressd.kernel.monitor_socket import FD_BASE, open_monitor_socket, raise_fd_limit
from egressd.kernel.netns import ContextCache
from egressd.model.config import load_config
from egressd.ruleset.exprs import FAMILY, TABLE, Json
from tests.integration.agent import AgentProcess

NEWGEN_TYPE = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
NLMSG = struct.Struct("=IHHII")
NLA = struct.Struct("=HH")
KINDS = ("delete table", "insert accept rule", "delete allow element")
SETTLE_S = 1.0  # after the queue is empty: the last monitor sockets are open by then
COST_SOCKETS = 2000  # sockets opened in this process to measure memory per watch
MONITOR_GAP_S = 0.2  # between tampers with the monitor on: each repair is long done before the next tamper


class TamperNamespaces(BatchNamespaces):
    """Throwaway namespaces et-<pid>-<i>; only names this object made are deleted."""

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"et-{os.getpid()}-"


def _newgen_pid(data: bytes, off: int, length: int) -> int | None:
    """NFTA_GEN_PROC_PID of the NEWGEN message at off: the id of the thread that committed."""
    pos, end = off + NLMSG.size + 4, off + length
    while pos + NLA.size <= end:
        alen, kind = NLA.unpack_from(data, pos)
        if alen < NLA.size:
            return None
        if kind & 0x3FFF == 2 and alen == 8:
            return int.from_bytes(data[pos + 4 : pos + 8], "big")
        pos += (alen + 3) & ~3
    return None


@dataclass
class Commit:
    t_ns: int  # perf_counter_ns when this process woke up with the NEWGEN
    pid: int | None
    by_agent: bool
    datagrams: list[bytes]  # the transaction's notifications, for timing the parser on them


class CommitClock(threading.Thread):
    """Timestamps every nftables commit in the watched namespaces, with the committing thread's id.

    One socket per namespace (the monitor's own opener: inside the namespace, at a high descriptor), all
    in one epoll: the timestamp is taken as this thread wakes, within microseconds of the commit.
    """

    def __init__(self, paths: Sequence[str], agent_pid: int) -> None:
        super().__init__(name="commit-clock", daemon=True)
        self.agent_pid = agent_pid
        self.commits: dict[str, list[Commit]] = {p: [] for p in paths}
        self.overflows = 0
        self._pending: dict[str, list[bytes]] = {p: [] for p in paths}
        self._selector = selectors.DefaultSelector()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._stop_event = threading.Event()
        for path in paths:
            sock, _ = open_monitor_socket(path, FD_BASE, 8 << 20)
            self._sockets.append(sock)
            self._selector.register(sock, selectors.EVENT_READ, path)

    def run(self) -> None:
        while not self._stop_event.is_set():
            for key, _ in self._selector.select(0.2):
                t = time.perf_counter_ns()
                self._drain(key.fileobj, key.data, t)  # type: ignore[arg-type]

    def _drain(self, sock: socket.socket, path: str, t: int) -> None:
        while True:
            try:
                data = sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError:
                self.overflows += 1  # ENOBUFS: the next NEWGEN still comes
                continue
            self._pending[path].append(data)
            off = 0
            while off + NLMSG.size <= len(data):
                length, kind, _, _, _ = NLMSG.unpack_from(data, off)
                if length < NLMSG.size:
                    break
                if kind == NEWGEN_TYPE:
                    pid = _newgen_pid(data, off, length)
                    by_agent = pid is not None and os.path.exists(f"/proc/{self.agent_pid}/task/{pid}")
                    with self._lock:
                        self.commits[path].append(Commit(t, pid, by_agent, self._pending[path]))
                    self._pending[path] = []
                off += (length + 3) & ~3

    def after(self, path: str, t_ns: int) -> list[Commit]:
        with self._lock:
            return [c for c in self.commits[path] if c.t_ns >= t_ns]

    def close(self) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(2)
        self._selector.close()
        for sock in self._sockets:
            sock.close()


def _elem_text(elem: Any) -> str:
    """A set element of `nft -j` as nft's command syntax writes it: an address, or a prefix (anything else,
    such as a range, as its JSON: it then matches no address or prefix)."""
    if isinstance(elem, str):
        return elem
    if isinstance(elem, dict) and "prefix" in elem:
        return f"{elem['prefix']['addr']}/{elem['prefix']['len']}"
    return json.dumps(elem, sort_keys=True)


class Tamperer:
    """Changes tables the way a tenant would, through a libnftables context of this process."""

    def __init__(self) -> None:
        self._contexts = ContextCache(_nft_with_handles)
        self.tid = threading.get_native_id()

    def _cmd(self, path: str, cmd: str) -> str:
        nft, _ = self._contexts.get(path)
        try:
            rc, out, err = nft.cmd(cmd)
        finally:
            self._contexts.drop(path)  # libnftables aborts at a descriptor >= 1024: keep none open
        if rc != 0:
            raise RuntimeError(f"{cmd!r} in {path}: {str(err).strip()}")
        return str(out)

    def listing(self, path: str) -> list[Json]:
        out = self._cmd(path, f"list table {FAMILY} {TABLE}")
        return [i for i in json.loads(out)["nftables"] if "metainfo" not in i]

    def prepare(self, path: str, kind: str) -> tuple[str, str | None]:
        """The command for one tamper, from the table as it is now (read before the clock starts), and the
        element it deletes (None for the other kinds)."""
        if kind == "delete table":
            return f"delete table {FAMILY} {TABLE}", None
        if kind == "insert accept rule":
            return f"insert rule {FAMILY} {TABLE} output accept", None
        for item in self.listing(path):
            s = item.get("set", {})
            if s.get("name", "").startswith("allow4_") and s.get("elem"):
                text = _elem_text(s["elem"][0])
                return f"delete element {FAMILY} {TABLE} {s['name']} {{ {text} }}", text
        raise RuntimeError(f"{path}: no allow4 set with elements to tamper with")

    def run(self, path: str, cmd: str) -> None:
        self._cmd(path, cmd)

    def undone(self, path: str, kind: str, fingerprint: str, element: str | None = None) -> str | None:
        """None when the tamper is gone and the table carries its fingerprint; else what is wrong. The
        fingerprint rule survives a deleted element: that one must be read back in the live allow4 set."""
        try:
            listing = self.listing(path)
        except RuntimeError as e:
            return str(e)
        found = next(
            (
                i["rule"].get("comment")
                for i in listing
                if "rule" in i and i["rule"]["chain"] == "fingerprint"
            ),
            None,
        )
        if found != fingerprint:
            return f"fingerprint {found!r}, expected {fingerprint}"
        output = [i["rule"]["expr"] for i in listing if "rule" in i and i["rule"]["chain"] == "output"]
        if kind == "insert accept rule" and [{"accept": None}] in output:
            return "the inserted accept rule is still there"
        if kind == "delete allow element":
            live = [i["set"] for i in listing if i.get("set", {}).get("name", "").startswith("allow4_")]
            if not any(element in map(_elem_text, s.get("elem", [])) for s in live):
                return f"the deleted element {element} is not back in {[s['name'] for s in live]}"
        return None

    def close(self) -> None:
        self._contexts.close()


@dataclass
class Tamper:
    path: str
    kind: str
    t_before_ns: int = 0
    element: str | None = None  # what a "delete allow element" tamper deleted: it must be back
    tamper_ns: int | None = None  # NEWGEN of the tamper itself
    repair_ns: int | None = None  # first commit by an agent thread after it
    problem: str | None = None

    @property
    def latency_ms(self) -> float | None:
        if self.tamper_ns is None or self.repair_ns is None:
            return None
        return (self.repair_ns - self.tamper_ns) / 1e6


@dataclass
class Phase:
    mode: str
    resync_interval: float
    start_s: float | None = None
    agent: dict[str, int] = field(default_factory=dict)
    high_fds: int | None = None
    monitor: dict[str, Any] | None = None
    tampers: list[Tamper] = field(default_factory=list)
    repaired_logs: int = 0
    own_parse_us: float | None = None
    own_messages: float | None = None
    kernel_kib_per_socket: float | None = None
    rss_kib_per_watch: float | None = None
    error: str | None = None

    def latencies(self) -> list[float]:
        return [t.latency_ms for t in self.tampers if t.latency_ms is not None]

    def verified(self) -> int:
        return sum(1 for t in self.tampers if t.latency_ms is not None and t.problem is None)


def high_fds(pid: int) -> int:
    """Descriptors at FD_BASE and above: the change monitor's sockets, and the raw writer's (one per namespace
    written lately)."""
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        if int(fd) >= FD_BASE:
            n += 1
    return n


def kernel_kib_per_socket(path: str, count: int) -> float:
    """Slab growth per monitor socket (socket, file, netlink state), from count sockets opened here at once.
    Kernel memory is not in the agent's RSS; the figure is noisy (other processes allocate too)."""

    def slab_kib() -> int:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Slab:"):
                return int(line.split()[1])
        raise RuntimeError("no Slab line in /proc/meminfo")

    before = slab_kib()
    socks = []
    try:
        for _ in range(count):
            socks.append(open_monitor_socket(path)[0])
        after = slab_kib()
    finally:
        for sock in socks:
            sock.close()
    return (after - before) / count


def _messages(data: bytes) -> int:
    n = off = 0
    while off + NLMSG.size <= len(data):
        length = NLMSG.unpack_from(data, off)[0]
        if length < NLMSG.size:
            break
        n += 1
        off += (length + 3) & ~3
    return n


def monitor_rss_kib_per_watch(path: str, count: int) -> float:
    """VmRSS growth per watch of a ChangeMonitor in this process (count watches of one namespace): the
    agent-side memory of watching, without the noise of comparing two agent processes."""

    def rss_kib() -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line in /proc/self/status")

    async def measure() -> float:
        monitor = ChangeMonitor(lambda sid: None)
        monitor.check_on_watch = False
        try:
            monitor.watch("warm-up", path)
            while monitor.info()["watched"] < 1:
                await asyncio.sleep(0.01)
            before = rss_kib()
            for i in range(count):
                monitor.watch(f"sb-{i}", path)
            while monitor.info()["watched"] < count + 1:
                await asyncio.sleep(0.01)
            return (rss_kib() - before) / count
        finally:
            monitor.close()

    return asyncio.run(measure())


def parse_cost_us(commits: Sequence[Commit]) -> tuple[float | None, float | None]:
    """Mean µs the agent's parser spends on one of its own transactions (the monitor's steady cost), and
    how many messages such a transaction brings."""
    batches = [c.datagrams for c in commits if c.by_agent and c.datagrams]
    if not batches:
        return None, None
    messages = sum(_messages(d) for batch in batches for d in batch) / len(batches)
    parser = TransactionParser(is_own=lambda tid: True)
    rounds = 200
    t0 = time.perf_counter()
    for _ in range(rounds):
        for batch in batches:
            for data in batch:
                parser.feed(data)
    return (time.perf_counter() - t0) / (rounds * len(batches)) * 1e6, messages


def run_phase(
    phase: Phase,
    world: ColdWorld,
    targets: Sequence[int],
    work: Path,
    view: KernelView,
    tamperer: Tamperer,
    deadline: Deadline,
) -> None:
    clean_tables(view, world, deadline)
    on = phase.mode == "monitor"
    agent = AgentProcess(
        work / phase.mode,
        resync_interval=phase.resync_interval,
        extra_config=f"watch_changes = {'true' if on else 'false'}\n",
    )
    clock: CommitClock | None = None
    try:
        write_feed(agent, world)
        _, done, _ = start_agent(agent, world, deadline, f"{phase.mode}: start")
        phase.start_s = done
        # Steady state: the verification pass after READY (a read of every table) is over. A tamper during
        # it waits its turn in the queue, which is a different figure (see bench/README.md).
        while not (info := agent.agent_status())["verified"] or info["queue"] > 0:
            deadline.check(f"{phase.mode}: verification pass")
            time.sleep(0.05)
        time.sleep(SETTLE_S)
        assert agent.proc is not None
        pid = agent.proc.pid
        phase.agent = proc_figures(pid)
        phase.high_fds = high_fds(pid)
        phase.monitor = json.loads(json.dumps(agent.agent_status().get("monitor")))
        paths = world.paths()
        fingerprints = {p: rs.fingerprint for p, rs in zip(paths, world.rulesets, strict=True)}
        chosen = [paths[i] for i in targets]
        clock = CommitClock(chosen, pid)
        clock.start()
        gap = MONITOR_GAP_S if on else phase.resync_interval / len(chosen)
        start = time.monotonic()
        for k, path in enumerate(chosen):
            deadline.check(f"{phase.mode}: tampering")
            kind = KINDS[k % len(KINDS)]
            cmd, element = tamperer.prepare(path, kind)
            delay = start + k * gap - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            t = Tamper(path, kind, time.perf_counter_ns(), element)
            tamperer.run(path, cmd)
            phase.tampers.append(t)
        # Wait for every repair: with the resync alone, up to one interval (+10 % jitter) and its pass.
        limit = time.monotonic() + (5.0 if on else 1.1 * phase.resync_interval + 10.0)
        while time.monotonic() < limit:
            deadline.check(f"{phase.mode}: waiting for repairs")
            if all(match(t, clock, tamperer.tid) for t in phase.tampers):
                break
            time.sleep(0.05)
        time.sleep(0.2)
        for t in phase.tampers:
            match(t, clock, tamperer.tid)
            if t.repair_ns is None:
                t.problem = "not repaired in time"
            else:
                t.problem = tamperer.undone(t.path, t.kind, fingerprints[t.path], t.element)
        phase.repaired_logs = len(agent.events("repaired"))
        phase.own_parse_us, phase.own_messages = parse_cost_us([c for p in chosen for c in clock.commits[p]])
        status_rows(agent, deadline, f"{phase.mode}: final status")  # the agent is alive and answering
    finally:
        if clock is not None:
            clock.close()
        agent.stop()


def match(t: Tamper, clock: CommitClock, tamper_tid: int) -> bool:
    """Find the tamper's own commit and the agent's first commit after it; True once both are seen."""
    commits = clock.after(t.path, t.t_before_ns)
    if t.tamper_ns is None:
        mine = next((c for c in commits if c.pid == tamper_tid), None)
        if mine is None:
            return False
        t.tamper_ns = mine.t_ns
    if t.repair_ns is None:
        repair = next((c for c in commits if c.by_agent and c.t_ns >= t.tamper_ns), None)
        if repair is None:
            return False
        t.repair_ns = repair.t_ns
    return True


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def report(phases: Sequence[Phase], n: int) -> list[tuple[str, str, str]]:
    by = {p.mode: p for p in phases}
    on, off = by.get("monitor"), by.get("resync")

    def col(p: Phase | None, fn: Any) -> str:
        if p is None:
            return "-"
        try:
            return str(fn(p))
        except (TypeError, ValueError, KeyError, ZeroDivisionError):
            return "-"

    def lat(p: Phase) -> str:
        v = p.latencies()
        return f"{_fmt(percentile(v, 50))} / {_fmt(percentile(v, 99))} / {_fmt(max(v) if v else None)}"

    def both(figure: str, fn: Any) -> tuple[str, str, str]:
        return figure, col(on, fn), col(off, fn)

    def mib(p: Phase) -> str:
        return f"{p.agent['vmrss_kib'] / 1024:.1f} / {p.agent['vmhwm_kib'] / 1024:.1f}"

    rows = [
        both("resync_interval, s", lambda p: f"{p.resync_interval:g}"),
        both("tamper -> repair commit, p50 / p99 / max ms", lat),
        both("tampers repaired and verified", lambda p: f"{p.verified()}/{len(p.tampers)}"),
        both(f"spawn -> all {n} enforced, s", lambda p: _fmt(p.start_s, ".2f")),
        both("agent descriptors (of which >= 1024)", lambda p: f"{p.agent['fds']} ({p.high_fds})"),
        both("agent RSS / peak RSS, MiB", mib),
        (
            "one own transaction: messages, parse us",
            col(on, lambda p: f"{p.own_messages:.0f}, {p.own_parse_us:.1f}"),
            "",
        ),
        (
            "kernel memory per monitor socket (Slab), KiB",
            col(on, lambda p: _fmt(p.kernel_kib_per_socket)),
            "",
        ),
        ("agent memory per watch (in-process), KiB", col(on, lambda p: _fmt(p.rss_kib_per_watch)), ""),
    ]
    if on is not None and off is not None and on.agent and off.agent:
        fds = (on.agent["fds"] - off.agent["fds"]) / n
        rss = (on.agent["vmrss_kib"] - off.agent["vmrss_kib"]) / n
        rows.append(("agents compared, per sandbox: +descriptors, +RSS KiB", f"{fds:.2f}, {rss:.1f}", ""))
    return rows


def table(rows: Sequence[tuple[str, str, str]]) -> str:
    head = f"{'figure':<48} {'monitor (events)':>22} {'resync only':>22}"
    return "\n".join([head, "-" * len(head), *(f"{a:<48} {b:>22} {c:>22}" for a, b, c in rows)])


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: tamper -> repair with the change monitor
    against the periodic resync alone (same run, same namespaces), and what the monitor costs in RSS."""
    by = {p["mode"]: p for p in results.get("phases", [])}
    on, off = by.get("monitor", {}), by.get("resync", {})
    n = results.get("args", {}).get("sandboxes")
    base = f"periodic resync alone (resync_interval = {off.get('resync_interval', '?'):g} s)" if off else None
    figures = []
    for q in ("p50", "p99"):
        figures.append(
            Figure(
                "tamper",
                f"tamper -> repair commit, N={n}, {q}",
                "ms",
                on.get("latency_ms", {}).get(q),
                off.get("latency_ms", {}).get(q),
                base,
                note=f"repaired and verified: {on.get('verified')}/{len(on.get('tampers', []))} monitor, "
                f"{off.get('verified')}/{len(off.get('tampers', []))} resync",
            )
        )
    rss = [p.get("agent", {}).get("vmrss_kib") for p in (on, off)]
    figures.append(
        Figure(
            "tamper",
            f"agent RSS with the monitor, N={n}",
            "MB",
            None if rss[0] is None else rss[0] * 1024 / 1e6,
            None if rss[1] is None else rss[1] * 1024 / 1e6,
            "agent without the monitor",
            note=f"descriptors {on.get('agent', {}).get('fds')} vs {off.get('agent', {}).get('fds')}",
        )
    )
    return figures


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.tamper", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=200, metavar="N", help="sandbox namespaces (200)")
    p.add_argument(
        "--tampers", type=int, default=50, metavar="T", help="tampers per agent (50), spread over N"
    )
    p.add_argument(
        "--resync", type=float, default=30.0, metavar="S", help="resync_interval of the baseline (30)"
    )
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (default 600)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every sample and machine info here")
    p.add_argument("--keep-workdir", action="store_true", help="keep agent logs and state for a look after")
    p.add_argument("--baseline-first", action="store_true", help="run the resync-only agent first")
    p.add_argument("--smoke", action="store_true", help="N=6, T=4, resync 2 s: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.tampers, args.resync = 6, 4, 2.0
    if args.sandboxes < 1 or args.tampers < 1 or args.resync <= 0 or args.max_seconds <= 0:
        p.error("--sandboxes, --tampers, --resync and --max-seconds must be positive")
    args.tampers = min(args.tampers, args.sandboxes)  # one tamper per sandbox: repairs never overlap
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 when every tamper was repaired and verified in both phases; 1 when not; 2 when aborted."""
    args = parse_args(argv)
    if not began("tamper"):
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    raise_fd_limit()  # the agents inherit it; this process needs high descriptors for its clocks too
    info = machine_info()
    namespaces = TamperNamespaces()
    phases = [Phase("monitor", 3600.0), Phase("resync", args.resync)]
    order = list(reversed(phases)) if args.baseline_first else phases
    aborted: str | None = None
    errors: list[str] = []
    view: KernelView | None = None
    tamperer: Tamperer | None = None
    work: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="egressd-bench-tamper-"))
            if not args.keep_workdir:
                stack.callback(shutil.rmtree, work, ignore_errors=True)
            names = namespaces.create_named([str(i) for i in range(args.sandboxes)], deadline)
            config_probe = AgentProcess(work / "config")  # the agents' own config: same fingerprints
            world = make_cold_world(names, load_config(str(config_probe.config_path), {}))
            targets = [i * args.sandboxes // args.tampers for i in range(args.tampers)]
            view = KernelView(cache=False)
            tamperer = Tamperer()
            for phase in order:
                try:
                    run_phase(phase, world, targets, work, view, tamperer, deadline)
                except (RuntimeError, OSError, ControlError, AssertionError) as e:
                    phase.error = f"{type(e).__name__}: {e}"
                    errors.append(f"{phase.mode}: {phase.error}")
            # Memory per watch, measured in this process after both agents, so that opening and closing
            # thousands of sockets does not weigh on either agent's figures.
            phases[0].kernel_kib_per_socket = kernel_kib_per_socket(world.paths()[0], COST_SOCKETS)
            phases[0].rss_kib_per_watch = monitor_rss_kib_per_watch(world.paths()[0], COST_SOCKETS)
            clean_tables(view, world, deadline)
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError, ControlError) as e:
        errors.append(f"setup: {type(e).__name__}: {e}")
    finally:
        if tamperer is not None:
            tamperer.close()
        if view is not None:
            view.close()
        for line in namespaces.delete():
            print(f"bench.tamper: could not delete namespace {line}", file=sys.stderr)
    wall = time.monotonic() - started
    for phase in phases:
        bad = [t for t in phase.tampers if t.problem]
        if bad and not phase.error:
            errors.append(f"{phase.mode}: {len(bad)} tampers not repaired: {bad[0].path}: {bad[0].problem}")

    print(
        f"egressd tamper benchmark: {args.tampers} tampers ({', '.join(KINDS)}, in turn) over "
        f"{args.sandboxes} sandboxes; latency = from the tamper's commit to the agent's repair commit, "
        f"both as NEWGEN notifications seen by this process"
    )
    print(f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}")
    print()
    rows = report(phases, args.sandboxes)
    print(table(rows))
    print()
    for e in errors:
        print(f"FAILED {e}")
    status = f"ABORTED: {aborted}" if aborted else (f"{len(errors)} FAILED" if errors else "complete")
    print(f"wall time {wall:.1f} s ({status})")
    if args.keep_workdir and work is not None:
        print(f"agent logs and state kept in {work}")
    if args.json:
        doc = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "machine": info,
            "phases": [
                {
                    **{k: v for k, v in asdict(p).items() if k != "tampers"},
                    "latency_ms": {
                        "n": len(p.latencies()),
                        "p50": percentile(p.latencies(), 50),
                        "p99": percentile(p.latencies(), 99),
                        "max": max(p.latencies()) if p.latencies() else None,
                    },
                    "verified": p.verified(),
                    "tampers": [asdict(t) | {"latency_ms": t.latency_ms} for t in p.tampers],
                }
                for p in phases
            ],
            "table": [list(r) for r in rows],
            "wall_s": wall,
            "aborted": aborted,
            "errors": errors,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
