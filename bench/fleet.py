"""Fleet benchmark: control-plane write to enforcement through NATS JetStream KV, against the local feed.

The agent's `nats://HOST:PORT` feed source, measured as a black box against a real nats-server with
JetStream on 127.0.0.1 (`tests/natsd.py`): the latency of one KV `put` until the agent's `wait` answers and
until the kernel commits it, a start with K keys already in the bucket, and the catch-up after the server was
down while keys changed. Every figure has its baseline in the same run, on the same namespaces: the same
updates and the same snapshot through the local feed, exactly as bench.agent measures them. Run as root
from the project root: `python -m bench.fleet [--smoke]` (see bench/README.md).
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
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import nats.errors

from bench.agent import (
    LOG_POLL_S,
    RESYNC_S,
    WAIT_TIMEOUT_S,
    BatchNamespaces,
    ColdWorld,
    CommitWatch,
    KernelView,
    Probe,
    Sample,
    _check_alive,
    all_enforced,
    check_fingerprints,
    clean_tables,
    connect_feed,
    ensure_fd_limit,
    fingerprint_for,
    make_cold_world,
    policy_doc,
    probe_update,
    proc_figures,
    quantiles,
    rotate_log,
    sandbox_doc,
    start_agent,
    status_rows,
    table,
    wait_started,
    workdir_fs,
    write_feed,
)
from bench.apply import NETNS_DIR, Aborted, Deadline, Row, began, machine_info
from bench.figures import Figure
from egressd.agent.control import ControlError, request
from egressd.model.config import Config, load_config
from tests.integration.agent import AgentProcess
from tests.natsd import KvClient, NatsServer, free_port

PROBE_HOST = "probe"  # [feed.nats] host_id of the latency agents: keys probe.<sandbox>
SNAPSHOT_HOST = "bench"  # ... and of the snapshot agent: its watch never sees the probe's keys
RECONNECT_CHANGES = 10
DISCONNECT_TIMEOUT_S = 15.0  # for the agent to notice the server is gone (a closed TCP connection: at once)
FEED_POLL_S = 0.05
UNIX_BASELINE = "the same updates through the local unix: feed (bench.agent's idle latency)"
T = TypeVar("T")
FILE_BASELINE = "the same K records as one snapshot in a file: feed (bench.agent's cold start)"


# --- the agent on a NATS feed ---------------------------------------------------------------------------


def nats_agent(workdir: Path, url: str, host_id: str) -> AgentProcess:
    """The agent watching `<host_id>.>` in the default bucket; [feed.nats] retries at their defaults."""
    return AgentProcess(
        workdir, feed=url, feed_config=f'[feed.nats]\nhost_id = "{host_id}"\n', resync_interval=RESYNC_S
    )


def kv_value(record: dict[str, Any]) -> dict[str, Any]:
    """What the control plane writes: the sandbox record without a revision (the KV revision is it)."""
    return {k: v for k, v in record.items() if k != "revision"}


def feed_health(agent: AgentProcess, deadline: Deadline, where: str) -> dict[str, Any]:
    try:
        return dict(
            request(agent.socket, {"cmd": "status"}, timeout=deadline.timeout(where))["agent"]["feed"]
        )
    except ControlError as e:
        _check_alive(agent, where, grace=1.0)
        raise RuntimeError(f"status during {where}: {e}") from None


def wait_revision(agent: AgentProcess, sid: str, revision: int, deadline: Deadline, where: str) -> None:
    """The agent's own `wait`: returns once `sid` is enforced at `revision` (or a later one)."""
    timeout = min(WAIT_TIMEOUT_S, deadline.timeout(where))
    req = {"cmd": "wait", "id": sid, "revision": revision, "timeout": timeout}
    try:
        answer = request(agent.socket, req, timeout=timeout + 5)
    except ControlError as e:
        _check_alive(agent, where, grace=1.0)
        raise RuntimeError(f"wait for {sid} revision {revision} during {where}: {e}") from None
    if not answer.get("ok"):
        raise RuntimeError(f"{sid} revision {revision} not enforced after {timeout:g} s ({where}): {answer}")


# --- figure 1: write -> enforced, idle ------------------------------------------------------------------


@dataclass
class NatsSample:
    sample: Sample
    put_ms: float  # until kv.put returned (the JetStream ack): the control plane's own wait
    revision: int


def nats_update(
    probe: Probe, kv: KvClient, agent: AgentProcess, watch: CommitWatch, deadline: Deadline
) -> NatsSample:
    """One update as probe_update makes it, but written with `kv.put`; timed from just before the put to the
    agent's `wait` answer for the revision the put returned, and to the kernel's commit."""
    _, line, fp = probe.next_update()  # the same two alternating policies as the unix feed's updates
    value = kv_value(json.loads(line)["sandbox"])
    watch.drain()
    t0 = time.perf_counter_ns()
    revision = kv.put(f"{PROBE_HOST}.{probe.sid}", value)
    t_put = time.perf_counter_ns()
    wait_revision(agent, probe.sid, revision, deadline, "nats latency")
    t_wait = time.perf_counter_ns()
    t_kernel = watch.wait_for(fp, t0, timeout=5.0)
    if t_kernel is None:
        raise RuntimeError(
            f"the agent reports {probe.sid} revision {revision} enforced, but no commit putting its "
            f"fingerprint in force was seen in {probe.name} ({watch.error or 'no error'})"
        )
    sample = Sample(t0 / 1e9, (t_kernel - t0) / 1e6, (t_wait - t0) / 1e6)
    return NatsSample(sample, (t_put - t0) / 1e6, revision)


@dataclass
class Latency:
    unix: list[Sample] = field(default_factory=list)
    nats: list[NatsSample] = field(default_factory=list)
    commit_overflows: int = 0
    loadavg: dict[str, list[float]] = field(default_factory=dict)  # 1-min load before and after each feed


def fresh_probe(view: KernelView, probe_name: str) -> None:
    """Each feed's agent starts on an empty probe namespace: a table left by the other would be adopted
    when its fingerprint matches the first update's, and that update would then commit nothing."""
    view.remove(str(NETNS_DIR / probe_name))


@contextlib.contextmanager
def probe_agent(
    res: Latency, label: str, agent: AgentProcess, probe_name: str, view: KernelView
) -> Iterator[tuple[Probe, CommitWatch]]:
    """One feed's agent, started on an empty probe namespace, with the probe and its commit watch; stopped
    on the way out, whatever happened."""
    fresh_probe(view, probe_name)
    res.loadavg[label] = [os.getloadavg()[0]]
    watch: CommitWatch | None = None
    try:
        agent.start()
        probe = Probe("probe-0", probe_name, 0, load_config(str(agent.config_path), {}))
        watch = CommitWatch(str(NETNS_DIR / probe_name))
        yield probe, watch
    finally:
        if watch is not None:
            res.commit_overflows += watch.overflows
            watch.close()
        agent.stop()
        res.loadavg[label].append(os.getloadavg()[0])


def measure(update: Callable[[], T], out: list[T], args: argparse.Namespace, deadline: Deadline) -> None:
    """Two warm-up updates (the namespace's context is made, both policies applied once), then U timed
    ones, `--gap-ms` apart: idle means the agent's state file write after a change is done (bench.agent)."""
    for _ in range(2):
        update()
    for _ in range(args.updates):
        deadline.check("latency")
        out.append(update())
        time.sleep(args.gap_ms / 1000)


def latency_unix(
    res: Latency,
    workdir: Path,
    probe_name: str,
    view: KernelView,
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    """Baseline: the probe's updates through a unix: feed, exactly as bench.agent's idle latency."""
    feed_path = str(workdir / "feed.sock")
    agent = AgentProcess(workdir, feed=f"unix:{feed_path}", resync_interval=RESYNC_S)
    with probe_agent(res, "unix", agent, probe_name, view) as (probe, watch), connect_feed(feed_path) as feed:
        measure(lambda: probe_update(probe, feed, agent, watch, deadline), res.unix, args, deadline)


def latency_nats(
    res: Latency,
    workdir: Path,
    url: str,
    probe_name: str,
    view: KernelView,
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    """The same probe, the same updates, written to the bucket the agent watches."""
    agent = nats_agent(workdir, url, PROBE_HOST)
    # The client first: it makes the bucket, before the agent looks for it.
    with KvClient(url) as kv, probe_agent(res, "nats", agent, probe_name, view) as (probe, watch):
        measure(lambda: nats_update(probe, kv, agent, watch, deadline), res.nats, args, deadline)


# --- figure 2: snapshot at start, and reconnect ---------------------------------------------------------


@dataclass
class Snapshot:
    """Start with K sandboxes in the feed: the file: baseline, then the bucket, then the reconnect."""

    file_ready_s: float | None = None
    file_all_s: float | None = None
    file_proc: dict[str, int] = field(default_factory=dict)
    fill_s: float | None = None  # K puts into the bucket before the agent starts (outside the figure)
    nats_ready_s: float | None = None
    nats_all_s: float | None = None
    nats_proc: dict[str, int] = field(default_factory=dict)
    nats_snapshot_ms: float | None = None  # the agent's own feed_connected log: reading the K initial values
    nats_verified_s: float | None = (
        None  # spawn -> `verified` logged: the pass comparing every table after READY
    )
    verified: bool = False


@dataclass
class Reconnect:
    changes: int = 0
    notice_s: float | None = None  # server stopped -> the agent's feed health says disconnected
    down_s: float | None = None  # server stopped -> started again
    retry_pending_s: float | None = None  # the agent's next retry, seen just before the server starts
    server_start_s: float | None = None  # spawn -> JetStream answers (NatsServer.start)
    all_enforced_s: float | None = None  # spawn of the server -> the last of the changes enforced
    after_server_ready_s: float | None = None  # server ready -> the last of the changes enforced
    unchanged_writes: int | None = None  # transactions on the K - changes untouched sandboxes meanwhile
    snapshots: int | None = None
    verified: bool = False


def snapshot_file(
    snap: Snapshot, world: ColdWorld, workdir: Path, view: KernelView, deadline: Deadline
) -> None:
    """Baseline: bench.agent's cold start, a file: feed holding one snapshot of the K records."""
    clean_tables(view, world, deadline)
    agent = AgentProcess(workdir, resync_interval=RESYNC_S)
    try:
        write_feed(agent, world)
        snap.file_ready_s, snap.file_all_s, _ = start_agent(agent, world, deadline, "file cold start")
        assert agent.proc is not None
        snap.file_proc = proc_figures(agent.proc.pid)
        check_fingerprints(view, world, "file cold start", deadline)
    finally:
        agent.stop()


def snapshot_nats(
    snap: Snapshot,
    rec: Reconnect,
    world: ColdWorld,
    workdir: Path,
    server: NatsServer,
    view: KernelView,
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    """K keys in the bucket, then the agent started: spawn -> READY and -> all K enforced at their KV
    revisions. Then, with the same agent: the server stopped, keys changed through a second server on the
    same store, the first server started again: its spawn -> every change enforced."""
    clean_tables(view, world, deadline)
    expected: dict[str, int] = {}
    with KvClient(server.url) as kv:
        t0 = time.perf_counter()
        for record in world.records:
            deadline.check("filling the bucket")
            expected[record["id"]] = kv.put(f"{SNAPSHOT_HOST}.{record['id']}", kv_value(record))
        snap.fill_s = time.perf_counter() - t0
    agent = nats_agent(workdir / "agent", server.url, SNAPSHOT_HOST)
    other: NatsServer | None = None
    try:
        tail = rotate_log(agent)
        t0 = time.perf_counter()
        agent.start(wait_ready=False)
        ready, done, _ = wait_started(agent, tail, expected, deadline, "nats cold start")
        snap.nats_ready_s, snap.nats_all_s = ready - t0, done - t0
        assert agent.proc is not None
        snap.nats_proc = proc_figures(agent.proc.pid)
        connected = agent.events("feed_connected")
        snap.nats_snapshot_ms = connected[0].get("snapshot_ms") if connected else None
        check_fingerprints(view, world, "nats cold start", deadline)
        snap.verified = True
        # After READY the agent compares every table whole once more; changes arriving meanwhile queue
        # behind that pass. The reconnect is measured in steady state, after it.
        while not any(e.get("event") == "verified" for e in tail.new_events()):
            _check_alive(agent, "verification pass")
            deadline.check("verification pass")
            time.sleep(LOG_POLL_S)
        snap.nats_verified_s = time.perf_counter() - t0

        # Reconnect: K enforced, the server goes away, the control plane writes meanwhile.
        before = {r["id"]: r["writes"] for r in status_rows(agent, deadline, "reconnect")}
        t_stop = time.perf_counter()
        server.stop()
        while feed_health(agent, deadline, "reconnect")["connected"]:
            if time.perf_counter() - t_stop > DISCONNECT_TIMEOUT_S:
                raise RuntimeError(f"the agent still reports the feed connected {DISCONNECT_TIMEOUT_S:g} s "
                                   "after the server stopped")  # fmt: skip
            time.sleep(FEED_POLL_S)
        rec.notice_s = time.perf_counter() - t_stop
        step = max(1, len(world.records) // args.changes)
        changed = world.records[::step][: args.changes]
        config = load_config(str(agent.config_path), {})
        fingerprints: dict[str, str] = {}
        other = NatsServer(server.dir, port=free_port()).start()
        with KvClient(other.url, create=False) as writer:
            for i, record in enumerate(changed):
                index = world.records.index(record)
                new = sandbox_doc(
                    record["id"], world.names[index], 2, policy_doc(1000 + index, 1 - index % 2)
                )
                expected[record["id"]] = writer.put(f"{SNAPSHOT_HOST}.{record['id']}", kv_value(new))
                fingerprints[record["id"]] = fingerprint_for(new, config)
                rec.changes = i + 1
        other.stop()
        other = None
        rec.retry_pending_s = _pending(feed_health(agent, deadline, "reconnect"))
        t_start = time.perf_counter()
        rec.down_s = t_start - t_stop
        server.start()
        t_up = time.perf_counter()
        rec.server_start_s = t_up - t_start
        for record in changed:  # in turn: when the last answers, every change is in force
            wait_revision(agent, record["id"], expected[record["id"]], deadline, "reconnect")
        t_done = time.perf_counter()
        rec.all_enforced_s, rec.after_server_ready_s = t_done - t_start, t_done - t_up

        rows = status_rows(agent, deadline, "reconnect check")
        if not all_enforced(rows, expected):
            raise RuntimeError("after the reconnect, not every sandbox is enforced at its latest KV revision")
        rec.unchanged_writes = sum(
            r["writes"] - before.get(r["id"], 0) for r in rows if r["id"] not in fingerprints
        )
        for record in changed:
            path = record["netns"]
            if (fp := view.fingerprint(path)) != fingerprints[record["id"]]:
                raise RuntimeError(f"{path} after the reconnect: kernel holds fingerprint {fp!r}, expected "
                                   f"{fingerprints[record['id']]}")  # fmt: skip
        rec.snapshots = int(feed_health(agent, deadline, "reconnect check")["snapshots"])
        rec.verified = True
    finally:
        agent.stop()
        if other is not None:
            other.stop()


def _pending(health: dict[str, Any]) -> float | None:
    at = health.get("retry_at")
    return None if at is None else max(0.0, float(at) - time.time())


# --- reporting -----------------------------------------------------------------------------------------


def rows_for(lat: Latency, snap: Snapshot, rec: Reconnect, k: int) -> list[Row]:
    """egressd column: the NATS feed; baseline column: the local feed; ratio = local / NATS."""
    rows: list[Row] = []
    kinds = (("kernel", "kernel commit"), ("wait", "wait answer"))
    for attr, label in kinds:
        n = quantiles([getattr(s.sample, f"{attr}_ms") for s in lat.nats])
        u = quantiles([getattr(s, f"{attr}_ms") for s in lat.unix])
        for q in ("p50", "p99", "max"):
            rows.append(Row(f"idle ({n['n']}/{u['n']}): write -> {label} {q} ms", n[q], u[q], True))
    put = quantiles([s.put_ms for s in lat.nats])
    rows.append(Row("  kv.put until acked p50 ms (NATS only)", put["p50"], None))
    rows.append(Row(f"snapshot K={k}: start -> READY, s", snap.nats_ready_s, snap.file_ready_s, True))
    rows.append(Row(f"snapshot K={k}: start -> all enforced, s", snap.nats_all_s, snap.file_all_s, True))
    rows.append(Row("  agent's own snapshot read (feed_connected), ms", snap.nats_snapshot_ms, None))
    rows.append(Row("  start -> verification pass done (`verified`), s", snap.nats_verified_s, None))
    rows.append(Row(f"  {k} puts before the start (outside the figure), s", snap.fill_s, None))
    rows.append(
        Row(f"reconnect: server spawn -> {rec.changes} changes enforced, s", rec.all_enforced_s, None)
    )
    rows.append(Row("  server spawn -> JetStream answers, s", rec.server_start_s, None))
    rows.append(Row("  agent's retry still pending at spawn, s", rec.retry_pending_s, None))
    rows.append(Row("  server down for, s", rec.down_s, None))
    rows.append(Row(f"  writes to the {k - rec.changes} unchanged sandboxes", rec.unchanged_writes, None))
    return rows


def to_json(
    args: argparse.Namespace,
    info: dict[str, Any],
    lat: Latency,
    snap: Snapshot,
    rec: Reconnect,
    rows: Sequence[Row],
    wall: float,
    aborted: str | None,
    errors: Sequence[str],
) -> dict[str, Any]:
    nats_q = {a: quantiles([getattr(s.sample, a) for s in lat.nats]) for a in ("kernel_ms", "wait_ms")}
    unix_q = {a: quantiles([getattr(s, a) for s in lat.unix]) for a in ("kernel_ms", "wait_ms")}

    def over(a: str, q: str) -> float | None:
        n, u = nats_q[a][q], unix_q[a][q]
        return None if n is None or not u else n / u

    return {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "nats_feed": asdict(Config().nats) | {"host_id": f"{PROBE_HOST} / {SNAPSHOT_HOST}"},
        "goals": {},
        "wall_seconds": wall,
        "aborted": aborted,
        "errors": list(errors),
        "latency": {
            "nats": nats_q
            | {
                "put_ms": quantiles([s.put_ms for s in lat.nats]),
                "samples": [
                    asdict(s.sample) | {"put_ms": s.put_ms, "revision": s.revision} for s in lat.nats
                ],
            },
            "unix": unix_q | {"samples": [asdict(s) for s in lat.unix]},
            "nats_over_unix": {f"{a}_{q}": over(a, q) for a in nats_q for q in ("p50", "p99", "max")},
            "commit_notification_overflows": lat.commit_overflows,
        },
        "snapshot": asdict(snap) | {"sandboxes": args.sandboxes},
        "loadavg_1min": lat.loadavg,
        "reconnect": asdict(rec),
        "table": [asdict(r) for r in rows],
    }


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: write -> enforced through NATS against the
    local unix: feed, start with K keys against a file: snapshot, and the catch-up after a reconnect. The
    issue set no goal for these; ratio = local feed / NATS (below 1: NATS is slower)."""
    lat = results.get("latency", {})
    nats_, unix = lat.get("nats", {}), lat.get("unix", {})
    figures: list[Figure] = []
    for key, label in (("kernel_ms", "kernel"), ("wait_ms", "agent's wait answer")):
        for q in ("p50", "p99"):
            figures.append(
                Figure(
                    "fleet",
                    f"NATS put -> enforced ({label}), idle, {q}",
                    "ms",
                    nats_.get(key, {}).get(q),
                    unix.get(key, {}).get(q),
                    UNIX_BASELINE,
                    note=f"{nats_.get(key, {}).get('n', 0)} updates each",
                )
            )
    settings = results.get("settings", {})
    snap = results.get("snapshot", {})
    k = snap.get("sandboxes", settings.get("sandboxes", 0))
    for key, label in (("ready_s", "READY"), ("all_s", "all enforced")):
        figures.append(
            Figure(
                "fleet",
                f"start with {k:,} keys in the bucket -> {label}",
                "s",
                snap.get(f"nats_{key}"),
                snap.get(f"file_{key}"),
                FILE_BASELINE,
                note="from spawning the agent",
            )
        )
    rec = results.get("reconnect", {})
    changes = rec.get("changes") or settings.get("changes", "?")
    pending = rec.get("retry_pending_s")
    figures.append(
        Figure(
            "fleet",
            f"reconnect: server start -> {changes} changes enforced",
            "s",
            rec.get("all_enforced_s"),
            note=f"{k:,} keys; includes the agent's retry backoff"
            + ("" if pending is None else f" ({pending:.2f} s still pending at the server's start)"),
        )
    )
    return figures


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.fleet", description=__doc__.splitlines()[0])
    p.add_argument("--updates", type=int, default=200, metavar="U", help="probe updates per feed (200)")
    p.add_argument(
        "--sandboxes", type=int, default=1000, metavar="K", help="keys in the bucket at start (1000)"
    )
    p.add_argument("--changes", type=int, default=RECONNECT_CHANGES, help="keys changed while down (10)")
    p.add_argument("--gap-ms", type=float, default=60.0, help="pause between probe updates (60)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (default 600)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write every sample and machine info here")
    p.add_argument("--keep-workdir", action="store_true", help="keep agent and nats-server logs for a look")
    p.add_argument("--smoke", action="store_true", help="U=20, K=20: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.updates, args.sandboxes = 20, 20
    if min(args.updates, args.sandboxes, args.changes) < 1 or args.max_seconds <= 0 or args.gap_ms < 0:
        p.error("counts and --max-seconds must be positive, --gap-ms not negative")
    if args.changes > args.sandboxes:
        p.error("--changes cannot exceed --sandboxes")
    return args


@contextlib.contextmanager
def phase_errors(errors: list[str], phase: str) -> Iterator[None]:
    """bench.agent's, plus the NATS client's errors: a failed phase is recorded, the next still runs."""
    try:
        yield
    except (RuntimeError, OSError, ControlError, nats.errors.Error) as e:
        errors.append(f"{phase}: {type(e).__name__}: {e}")


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed; 1 when a phase failed a check; 2 when it could not run or was aborted."""
    args = parse_args(argv)
    if not began("fleet"):
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    info = machine_info()
    note = ensure_fd_limit(args.sandboxes)
    lat, snap, rec = Latency(), Snapshot(), Reconnect()
    aborted: str | None = None
    errors: list[str] = []
    namespaces = BatchNamespaces()
    view: KernelView | None = None
    servers: list[NatsServer] = []
    work: Path | None = None
    try:
        work = Path(tempfile.mkdtemp(prefix="egressd-bench-fleet-"))
        info["workdir_fs"] = workdir_fs(work)
        probe = namespaces.create_named(["p0"], deadline)[0]
        names = namespaces.create_named([f"c{i}" for i in range(args.sandboxes)], deadline)
        servers.append(NatsServer(work / "nats"))
        servers[0].start()
        view = KernelView(cache=False)
        with phase_errors(errors, "unix latency"):
            latency_unix(lat, work / "unix", probe, view, args, deadline)
        with phase_errors(errors, "nats latency"):
            latency_nats(lat, work / "nats-latency", servers[0].url, probe, view, args, deadline)
        world = make_cold_world(names, load_config(str(work / "unix" / "egressd.toml"), {}))
        with phase_errors(errors, "file snapshot"):
            snapshot_file(snap, world, work / "file", view, deadline)
        with phase_errors(errors, "nats snapshot and reconnect"):
            snapshot_nats(snap, rec, world, work / "nats-snapshot", servers[0], view, args, deadline)
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError, nats.errors.Error) as e:  # setup: namespaces, work dir, the server
        errors.append(f"setup: {type(e).__name__}: {e}")
    finally:
        for server in servers:
            server.stop()
        if view is not None:
            view.close()
        for line in namespaces.delete():
            print(f"bench.fleet: could not delete namespace {line}", file=sys.stderr)
        if work is not None and not args.keep_workdir:
            shutil.rmtree(work, ignore_errors=True)
    wall = time.monotonic() - started

    rows = rows_for(lat, snap, rec, args.sandboxes)
    print(
        "egressd fleet benchmark: egressd column = the nats:// feed (a real nats-server with JetStream on "
        "127.0.0.1), baseline = the local feed (unix: for updates, a file: snapshot at start); ms from just "
        "before the write (kv.put / the feed line) until the kernel commit (NEWGEN) or the agent's `wait` "
        "answer; ratio = local / NATS"
    )
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}, "
        f"state dir on {info.get('workdir_fs', '?')}" + (f"; {note}" if note else "")
    )
    print()
    print(table(rows))
    status = f"ABORTED: {aborted}" if aborted else (f"{len(errors)} FAILED" if errors else "complete")
    print()
    for e in errors:
        print(f"FAILED {e}")
    print(
        f"wall time {wall:.1f} s ({status}); snapshot verified: {snap.verified}, "
        f"reconnect verified: {rec.verified}"
    )
    if args.keep_workdir and work is not None:
        print(f"agent and nats-server logs kept in {work}")
    if args.json:
        doc = to_json(args, info, lat, snap, rec, rows, wall, aborted, errors)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
