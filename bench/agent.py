"""Agent benchmark: event-to-enforced latency (idle and in a storm), cold start and restart at N sandboxes.

`egressd run` is measured as a black box from outside: events go in through its feed, and "enforced" is
what the kernel holds, seen by this process with its own netlink socket and libnftables contexts, next to
what the agent itself reports over its control socket. Run as root from the project root:
`python -m bench.agent` (see bench/README.md for what each figure means).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import errno
import io
import json
import os
import pstats
import queue
import resource
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from bench.apply import (
    NETNS_DIR,
    Aborted,
    Deadline,
    Namespaces,
    Row,
    _fmt,
    baseline_apply,
    began,
    entries,
    machine_info,
    run,
)
from bench.figures import Figure
from egressd.agent.control import ControlError, request
from egressd.feed.lines import DEFAULT_MAX_LINE
from egressd.kernel.netns import ContextCache, NetnsError
from egressd.model.config import Config, load_config
from egressd.model.sandbox import parse_sandbox
from egressd.ruleset.exprs import FAMILY, TABLE, Json
from egressd.ruleset.render import FINGERPRINT_CHAIN, Ruleset, render
from egressd.ruleset.transactions import fingerprint_of
from tests.integration.agent import AgentProcess

IDLE_P99_GOAL_MS = 20.0
COLD_GOAL_S = 3.0
RESTART_GOAL_S = 1.0
POLICY_ENTRIES = 10  # CIDRs per policy: "small policies"
CLI_SAMPLE = 20  # namespaces whose table handle is also read with the nft CLI
WAIT_TIMEOUT_S = 30.0
LOG_POLL_S = 0.005  # how often the agent's log is looked at for "ready": a stat and a read, nearly free
STATUS_POLL_S = 0.02  # how often status is asked while waiting: each answer costs the agent O(sandboxes)
STORM_PRIME_FLAVOUR = 1  # the policy storm sandboxes hold before the first round
RESYNC_S = 3600.0  # periodic resync kept out of the measurements: it is a different cost

# Netlink: every committed nftables transaction ends with NFT_MSG_NEWGEN on the NFNLGRP_NFTABLES group.
NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
SO_RCVBUFFORCE = 33
NFNLGRP_NFTABLES = 7
NFT_MSG_NEWGEN = (10 << 8) | 15  # NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN
NLMSG_HEADER = struct.Struct("=IHHII")


# --- namespaces, kernel views -------------------------------------------------------------------------


class BatchNamespaces(Namespaces):
    """Throwaway namespaces ea-<pid>-<suffix>, made and deleted with one `ip -batch` each.

    One `ip netns add` process per namespace takes seconds at 1,000; a batch takes a fraction of one. Only
    names this object chose are ever deleted, and it refuses names that exist before it made them.
    """

    def __init__(self) -> None:
        super().__init__()
        self.prefix = f"ea-{os.getpid()}-"

    def create_named(self, suffixes: Sequence[str], deadline: Deadline) -> list[str]:
        names = [self.prefix + s for s in suffixes]
        for name in names:
            if (NETNS_DIR / name).exists():
                raise RuntimeError(f"namespace {name} already exists and is not ours; refusing to use it")
        self.names.extend(names)  # before the batch: if it stops halfway, delete() still finds what it made
        script = "".join(f"netns add {n}\n" for n in names)
        try:
            proc = subprocess.run(
                ["ip", "-batch", "-"],
                input=script,
                capture_output=True,
                text=True,
                timeout=deadline.timeout("namespace setup"),
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise Aborted("ip -batch (netns add) timed out") from None
        if proc.returncode != 0:
            raise RuntimeError(f"ip -batch netns add failed: {proc.stderr.strip()}")
        return names

    def delete(self) -> list[str]:
        """Delete what we created, deadline or not; returns failures rather than raising (runs in finally)."""
        mine = [n for n in self.names if (NETNS_DIR / n).exists()]
        failed: list[str] = []
        if mine:
            try:
                subprocess.run(
                    ["ip", "-force", "-batch", "-"],
                    input="".join(f"netns del {n}\n" for n in mine),
                    capture_output=True,
                    text=True,
                    timeout=120,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                failed.append("ip -batch netns del timed out")
            failed += [f"{n}: still there" for n in mine if (NETNS_DIR / n).exists()]
        self.names.clear()
        return failed


def _nft_with_handles() -> Any:
    import nftables  # Debian's python3-nftables, as egressd.kernel.nft uses it

    nft = nftables.Nftables()
    nft.set_json_output(True)
    nft.set_handle_output(True)
    return nft


class KernelView:
    """What the kernel holds, read through contexts of this process: never the agent's word for it.

    Handles are on, because an unchanged table handle is the proof that a restart rewrote nothing. With
    `cache=False` each context is closed after use: libnftables 1.0.6 select()s on its netlink socket when
    it commits, and aborts the process once that descriptor is 1024 or more, which 1,000 cached contexts
    (two descriptors each) would reach.
    """

    def __init__(self, cache: bool = True) -> None:
        self._contexts = ContextCache(_nft_with_handles)
        self._keep = cache

    def _cmd(self, path: str, cmd: str) -> tuple[int, str, str]:
        nft, _ = self._contexts.get(path)
        try:
            rc, out, err = nft.cmd(cmd)
        finally:
            if not self._keep:
                self._contexts.drop(path)
        return int(rc), str(out), str(err)

    def _list(self, path: str, what: str) -> list[Json] | None:
        rc, out, err = self._cmd(path, f"list {what}")
        if rc != 0:
            if "No such file or directory" in err:
                return None
            raise RuntimeError(f"list {what} in {path}: {err.strip()}")
        return [i for i in json.loads(out)["nftables"] if "metainfo" not in i] if out else []

    def fingerprint(self, path: str) -> str | None:
        listing = self._list(path, f"chain {FAMILY} {TABLE} {FINGERPRINT_CHAIN}")
        return None if listing is None else fingerprint_of(listing)

    def table_handle(self, path: str) -> int | None:
        for item in self._list(path, "tables") or []:
            t = item.get("table", {})
            if t.get("family") == FAMILY and t.get("name") == TABLE:
                return int(t["handle"])
        return None

    def remove(self, path: str) -> None:
        rc, _, err = self._cmd(path, f"delete table {FAMILY} {TABLE}")
        if rc != 0 and "No such file or directory" not in err:
            raise RuntimeError(f"delete table in {path}: {err.strip()}")

    def close(self) -> None:
        self._contexts.close()


def cli_handle(name: str, deadline: Deadline) -> int | None:
    """The table handle as the nft CLI sees it inside the namespace: a second, separate witness."""
    proc = run(["ip", "netns", "exec", name, "nft", "-j", "list", "tables"], deadline, "handle check")
    for item in json.loads(proc.stdout)["nftables"]:
        t = item.get("table", {})
        if t.get("family") == FAMILY and t.get("name") == TABLE:
            return int(t["handle"])
    return None


def _commit_socket() -> socket.socket:
    """Made inside the namespace (by ContextCache): hears every nftables commit there, with no polling."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        sock.settimeout(0.2)  # so the reader thread notices close() without a signal
    except OSError:
        sock.close()
        raise
    return sock


def _has_newgen(data: bytes) -> bool:
    off = 0
    while off + NLMSG_HEADER.size <= len(data):
        length, kind, _, _, _ = NLMSG_HEADER.unpack_from(data, off)
        if kind == NFT_MSG_NEWGEN:
            return True
        if length < NLMSG_HEADER.size:
            return False
        off += (length + 3) & ~3
    return False


class CommitWatch:
    """Timestamps each nftables commit in one namespace, then reads the fingerprint it put in force.

    The NEWGEN message arrives within microseconds of the commit, so the timestamp costs the agent nothing
    (no polling loop competes with it for the 2 CPUs) and needs nothing from it. The fingerprint read comes
    after the timestamp, so its cost is outside the measurement.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.events: queue.Queue[tuple[int, str | None]] = queue.Queue()
        self.overflows = 0
        self.error: str | None = None
        self._sockets = ContextCache(_commit_socket)
        self._view = KernelView()
        self._sock: socket.socket = self._sockets.get(path)[0]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="commit-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(1 << 20)
            except TimeoutError:
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # notifications were lost; the next NEWGEN still comes
                    self.overflows += 1
                    continue
                if not self._stop.is_set():
                    self.error = str(e)
                return
            t = time.perf_counter_ns()
            if _has_newgen(data):
                try:
                    fp = self._view.fingerprint(self.path)
                except (RuntimeError, OSError, NetnsError) as e:
                    self.error = str(e)
                    fp = None
                self.events.put((t, fp))

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.events.get_nowait()

    def wait_for(self, fingerprint: str, after_ns: int, timeout: float) -> int | None:
        """perf_counter_ns of the first commit after `after_ns` that put `fingerprint` in force."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            try:
                t, fp = self.events.get(timeout=left)
            except queue.Empty:
                break
            if fp == fingerprint and t >= after_ns:
                return t
        return None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._sockets.close()
        self._view.close()


# --- the agent, from outside ------------------------------------------------------------------------------


class LogTail:
    """New lines of the agent's JSON log since the last look: re-reading a growing log would cost more."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self._rest = b""

    def new_events(self) -> list[dict[str, Any]]:
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self._rest = (self._rest + data).split(b"\n")
        out = []
        for line in lines:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                out.append(doc)
        return out


def rotate_log(agent: AgentProcess) -> LogTail:
    """A fresh log before each start: AgentProcess.start parses an existing log, which would be timed too."""
    if agent.log_path.exists():
        n = 1
        while agent.log_path.with_suffix(f".{n}.log").exists():
            n += 1
        agent.log_path.rename(agent.log_path.with_suffix(f".{n}.log"))
    return LogTail(agent.log_path)


def _check_alive(agent: AgentProcess, where: str, grace: float = 0.0) -> None:
    """An agent that died says how: its exit status and the last lines it logged (an abort's message).

    `grace`: after a connection broke, the process may need a moment before it can be reaped.
    """
    if agent.proc is not None and grace:
        with contextlib.suppress(subprocess.TimeoutExpired):
            agent.proc.wait(timeout=grace)
    if agent.proc is None or agent.proc.poll() is not None:
        code = None if agent.proc is None else agent.proc.returncode
        lines = agent.log_path.read_text(errors="replace").splitlines() if agent.log_path.exists() else []
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        tail = "\n  ".join(line[:300] for line in lines[-4:])
        raise RuntimeError(f"the agent died during {where} ({how}); its last log lines:\n  {tail}")


def send_feed(feed: socket.socket, data: bytes, agent: AgentProcess, where: str) -> None:
    """A write to the feed fails when the agent is gone: say that, not just 'broken pipe'."""
    try:
        feed.sendall(data)
    except OSError:
        _check_alive(agent, where, grace=1.0)
        raise


def status_rows(agent: AgentProcess, deadline: Deadline, where: str) -> list[dict[str, Any]]:
    try:
        return list(request(agent.socket, {"cmd": "status"}, timeout=deadline.timeout(where))["sandboxes"])
    except ControlError as e:
        _check_alive(agent, where, grace=1.0)
        raise RuntimeError(f"status during {where}: {e}") from None


def all_enforced(rows: Sequence[Mapping[str, Any]], expected: Mapping[str, int]) -> bool:
    by_id = {r["id"]: r for r in rows}
    for sid, rev in expected.items():
        row = by_id.get(sid)
        if row is None or row["state"] != "enforced" or row["revision"] != rev:
            return False
    return True


def wait_all_enforced(
    agent: AgentProcess, expected: Mapping[str, int], deadline: Deadline, where: str
) -> tuple[float, list[dict[str, Any]]]:
    """Poll status until every expected sandbox is enforced at its revision; (perf_counter then, rows)."""
    while True:
        rows = status_rows(agent, deadline, where)
        now = time.perf_counter()
        if all_enforced(rows, expected):
            return now, rows
        _check_alive(agent, where)
        deadline.check(where)
        time.sleep(STATUS_POLL_S)


def wait_started(
    agent: AgentProcess, tail: LogTail, expected: Mapping[str, int], deadline: Deadline, where: str
) -> tuple[float, float, list[dict[str, Any]]]:
    """Ready in the log, then status until all are enforced: status is not asked while the agent starts,
    since each answer costs it work proportional to the number of sandboxes. Returns (ready, done, rows)."""
    while True:
        if any(e.get("event") == "ready" for e in tail.new_events()):
            ready = time.perf_counter()
            break
        _check_alive(agent, where)
        deadline.check(where)
        time.sleep(LOG_POLL_S)
    done, rows = wait_all_enforced(agent, expected, deadline, where)
    return ready, done, rows


def proc_figures(pid: int) -> dict[str, int]:
    """Resident memory (now and peak, KiB) and open descriptors: what 1,000 cached contexts cost the host."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key.lower() + "_kib"] = int(value.split()[0])
    out["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    return out


class ProfiledAgent(AgentProcess):
    """The agent under profile_agent(): AgentProcess.start fixes the command line, so only it is redone."""

    def __init__(self, workdir: Path, profile_out: Path, **kwargs: Any) -> None:
        super().__init__(workdir, **kwargs)
        self.profile_out = profile_out

    def start(self, wait_ready: bool = True, stdin: int = subprocess.DEVNULL) -> AgentProcess:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    *(sys.executable, "-m", "bench.agent", "--profile-agent", str(self.profile_out)),
                    *("run", "--config", str(self.config_path)),
                ],
                stdin=stdin,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONUNBUFFERED": "1", **self.env},
            )
        if wait_ready:
            self.wait_log("ready", timeout=60)
        return self


def profile_agent(out: Path, argv: list[str]) -> int:
    """`egressd` with cProfile in every thread, merged into `out` at exit.

    `python -m cProfile` sees only the main thread, and the agent's netlink work runs in worker threads.
    """
    from egressd.cli import main as egressd_main

    profiles: list[cProfile.Profile] = []
    guard = threading.Lock()

    def per_thread(frame: FrameType, event: str, arg: object) -> None:
        prof = cProfile.Profile()
        with guard:
            profiles.append(prof)
        prof.enable()  # replaces this hook for the rest of the thread

    threading.setprofile(per_thread)
    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        return egressd_main(argv)
    finally:
        main_prof.disable()
        stats = pstats.Stats(main_prof)
        with guard:
            for prof in profiles:
                stats.add(prof)
        stats.dump_stats(str(out))


# --- workload -------------------------------------------------------------------------------------------


def policy_doc(index: int, flavour: int) -> dict[str, Any]:
    """A small network_policy of its own for sandbox `index`; flavours 0 and 1 differ in every list."""
    nets = [str(n) for n in entries(2 * index + flavour, POLICY_ENTRIES)]
    if flavour:
        return {"allow_internet_access": True, "allow_out": nets, "deny_out": ["203.0.113.0/24"]}
    return {"allow_internet_access": False, "allow_out": nets, "deny_out": []}


def sandbox_doc(sid: str, name: str, revision: int, policy: dict[str, Any]) -> dict[str, Any]:
    return {"id": sid, "netns": str(NETNS_DIR / name), "revision": revision, "network_policy": policy}


def upsert_line(record: dict[str, Any]) -> bytes:
    return (json.dumps({"type": "upsert", "sandbox": record}) + "\n").encode()


def fingerprint_for(record: dict[str, Any], config: Config) -> str:
    return ruleset_for(record, config).fingerprint


def ruleset_for(record: dict[str, Any], config: Config) -> Ruleset:
    """What the agent will render for this record: the same parser and renderer, the same config."""
    return render(parse_sandbox(record).policy, config)


def connect_feed(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    return sock


def percentile(values: Sequence[float], q: float) -> float | None:
    """Nearest rank: an observed value, never an interpolation between two."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def quantiles(values: Sequence[float]) -> dict[str, float | int | None]:
    """n, p50, p99 and max of a latency list (named so that `summary` is the suite's hook)."""
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p99": percentile(values, 99),
        "max": max(values) if values else None,
    }


@dataclass
class Probe:
    """The probe sandbox: alternating between two policies, each update a new revision."""

    sid: str
    name: str
    index: int
    config: Config
    revision: int = 0

    def next_update(self) -> tuple[int, bytes, str]:
        self.revision += 1
        record = sandbox_doc(self.sid, self.name, self.revision, policy_doc(self.index, self.revision % 2))
        return self.revision, upsert_line(record), fingerprint_for(record, self.config)


@dataclass
class Sample:
    t0: float  # perf_counter when the line was written
    kernel_ms: float
    wait_ms: float


def probe_update(
    probe: Probe, feed: socket.socket, agent: AgentProcess, watch: CommitWatch, deadline: Deadline
) -> Sample:
    """One update: written to the feed, then the agent's `wait` answer and the kernel's commit, both timed."""
    revision, line, fp = probe.next_update()
    watch.drain()
    wait_timeout = min(WAIT_TIMEOUT_S, deadline.timeout("latency"))
    t0 = time.perf_counter_ns()
    send_feed(feed, line, agent, "latency")
    req = {"cmd": "wait", "id": probe.sid, "revision": revision, "timeout": wait_timeout}
    try:
        answer = request(agent.socket, req, timeout=wait_timeout + 5)
    except ControlError as e:
        _check_alive(agent, "latency", grace=1.0)
        raise RuntimeError(f"wait for {probe.sid} revision {revision}: {e}") from None
    t_wait = time.perf_counter_ns()
    if not answer.get("ok"):
        raise RuntimeError(f"{probe.sid} revision {revision} not enforced after {wait_timeout:g} s: {answer}")
    t_kernel = watch.wait_for(fp, t0, timeout=5.0)
    if t_kernel is None:
        raise RuntimeError(
            f"the agent reports {probe.sid} revision {revision} enforced, but no commit putting its "
            f"fingerprint in force was seen in {probe.name} ({watch.error or 'no error'})"
        )
    return Sample(t0 / 1e9, (t_kernel - t0) / 1e6, (t_wait - t0) / 1e6)


@dataclass
class StormRound:
    events: int
    start: float
    written: float
    done: float

    @property
    def seconds(self) -> float:
        return self.done - self.start


class Storm(threading.Thread):
    """Rounds of `events` upserts to the storm sandboxes, each written as fast as the socket takes it, until
    told to stop; a round ends when status shows every storm sandbox at its last revision.

    Within a round each sandbox flaps between its two policies, and it always ends on the other policy than
    it started with. Otherwise (an even number of events each) a round would end where it began, and an
    agent that reads the latest state, as egressd's does, could rightly skip most of the work.
    """

    def __init__(
        self,
        feed_path: str,
        agent: AgentProcess,
        names: Sequence[str],
        revisions: dict[str, int],
        events: int,
        deadline: Deadline,
    ) -> None:
        super().__init__(name="storm", daemon=True)
        self.feed_path = feed_path
        self.agent = agent
        self.names = list(names)
        self.revisions = revisions
        self.events = events
        self.deadline = deadline
        self.rounds: list[StormRound] = []
        self.active = threading.Event()
        self.stop_after_round = threading.Event()
        self.error: str | None = None
        self.policies = [(policy_doc(i + 1, 0), policy_doc(i + 1, 1)) for i in range(len(names))]
        self.in_force = [STORM_PRIME_FLAVOUR] * len(names)  # the flavour each sandbox ended the last round on

    def _blob(self) -> tuple[bytes, dict[str, int]]:
        count = len(self.names)
        per = [self.events // count + (1 if i < self.events % count else 0) for i in range(count)]
        # An odd number of flaps starts on the other policy, an even number on the same: both end on the other
        first = [f ^ (n % 2) for f, n in zip(self.in_force, per, strict=True)]
        lines = []
        for j in range(self.events):
            i = j % count
            sid = f"storm-{i}"
            self.revisions[sid] += 1
            flavour = first[i] ^ ((j // count) % 2)
            record = sandbox_doc(sid, self.names[i], self.revisions[sid], self.policies[i][flavour])
            lines.append(upsert_line(record))
            self.in_force[i] = flavour
        return b"".join(lines), dict(self.revisions)

    def run(self) -> None:
        try:
            with connect_feed(self.feed_path) as feed:
                while not self.stop_after_round.is_set():
                    blob, expected = self._blob()
                    self.active.set()
                    start = time.perf_counter()
                    send_feed(feed, blob, self.agent, "storm")
                    written = time.perf_counter()
                    done, _ = wait_all_enforced(self.agent, expected, self.deadline, "storm")
                    self.active.clear()
                    self.rounds.append(StormRound(self.events, start, written, done))
        except (RuntimeError, OSError, Aborted) as e:
            self.error = str(e)
        finally:
            self.active.clear()


@dataclass
class LatencyResult:
    idle: list[Sample] = field(default_factory=list)
    storm: list[Sample] = field(default_factory=list)
    storm_rounds: list[StormRound] = field(default_factory=list)
    storm_outside: int = 0  # probe samples taken between rounds, left out
    storm_error: str | None = None
    commit_overflows: int = 0


def bench_latency(
    res: LatencyResult,
    workdir: Path,
    probe_name: str,
    storm_names: Sequence[str],
    args: argparse.Namespace,
    deadline: Deadline,
) -> None:
    """Figures 1 and 2: one agent on a unix feed; the probe sandbox alone, then during storms."""
    feed_path = str(workdir / "feed.sock")
    agent = AgentProcess(
        workdir, feed=f"unix:{feed_path}", resync_interval=RESYNC_S, extra_config=agent_extra(args)
    )
    watch: CommitWatch | None = None
    storm: Storm | None = None
    try:
        rotate_log(agent)
        agent.start()
        config = load_config(str(agent.config_path), {})
        probe = Probe("probe-0", probe_name, 0, config)
        watch = CommitWatch(str(NETNS_DIR / probe_name))
        with connect_feed(feed_path) as feed:
            for _ in range(2):  # warm-up: the namespace's context is made, both policies applied once
                probe_update(probe, feed, agent, watch, deadline)
            for _ in range(args.updates):
                deadline.check("idle latency")
                res.idle.append(probe_update(probe, feed, agent, watch, deadline))
                time.sleep(args.gap_ms / 1000)

            # Storm sandboxes exist and are enforced before the first round: rounds measure steady state.
            revisions = {f"storm-{i}": 1 for i in range(len(storm_names))}
            prime = b"".join(
                upsert_line(sandbox_doc(f"storm-{i}", n, 1, policy_doc(i + 1, STORM_PRIME_FLAVOUR)))
                for i, n in enumerate(storm_names)
            )
            send_feed(feed, prime, agent, "storm setup")
            wait_all_enforced(agent, revisions, deadline, "storm setup")
            storm = Storm(feed_path, agent, storm_names, revisions, args.storm_events, deadline)
            storm.start()
            storm_end = time.monotonic() + args.storm_seconds
            while len(res.storm) < args.updates and storm.is_alive() and time.monotonic() < storm_end:
                deadline.check("storm latency")
                if not storm.active.wait(timeout=1.0):
                    continue
                sample = probe_update(probe, feed, agent, watch, deadline)
                if storm.active.is_set():
                    res.storm.append(sample)
                else:
                    res.storm_outside += 1
                time.sleep(args.gap_ms / 1000)
            storm.stop_after_round.set()
            storm.join(timeout=deadline.timeout("storm"))
            res.storm_rounds = list(storm.rounds)
            res.storm_error = storm.error
            if storm.error:
                raise RuntimeError(f"storm: {storm.error}")
            # Exact now that the rounds are known: keep only samples written while a round was under way.
            inside = [s for s in res.storm if any(r.start <= s.t0 <= r.done for r in res.storm_rounds)]
            res.storm_outside += len(res.storm) - len(inside)
            res.storm = inside
    finally:
        if storm is not None:
            storm.stop_after_round.set()
        if watch is not None:
            res.commit_overflows = watch.overflows
            watch.close()
        agent.stop()
        if storm is not None:
            storm.join(timeout=5)
            if not res.storm_rounds:  # the phase failed: keep the rounds that did complete
                res.storm_rounds, res.storm_error = list(storm.rounds), storm.error


# --- cold start and restart -----------------------------------------------------------------------------


@dataclass
class ColdRepeat:
    """One cold start + SIGKILL + restart, and the baseline, at N sandboxes; `writes`: how the agent wrote
    the sandbox tables (raw netlink, as shipped, or libnftables: --writes)."""

    writes: str = "raw"
    baseline_s: float | None = None
    cold_s: float | None = None
    cold_ready_s: float | None = None
    cold_writes: int | None = None
    cold_proc: dict[str, int] = field(default_factory=dict)
    restart_s: float | None = None
    restart_ready_s: float | None = None
    restart_writes: int | None = None
    restart_rows_written: int | None = None
    restart_reconciles: dict[str, int] = field(default_factory=dict)
    restart_proc: dict[str, int] = field(default_factory=dict)
    handles_checked: int = 0
    handles_changed: int | None = None
    cli_checked: int = 0
    cli_changed: int | None = None
    verified: bool = False


@dataclass(frozen=True)
class ColdWorld:
    names: list[str]
    records: list[dict[str, Any]]
    rulesets: list[Ruleset]
    feed_line: dict[str, Any] | None  # the snapshot, or None when it would not fit in one feed line

    @property
    def expected(self) -> dict[str, int]:
        return {r["id"]: r["revision"] for r in self.records}

    def paths(self) -> list[str]:
        return [str(NETNS_DIR / n) for n in self.names]


def make_cold_world(names: Sequence[str], config: Config) -> ColdWorld:
    records = [sandbox_doc(f"sb-{i}", n, 1, policy_doc(1000 + i, i % 2)) for i, n in enumerate(names)]
    rulesets = [ruleset_for(r, config) for r in records]
    snapshot = {"type": "snapshot", "sandboxes": records}
    fits = len(json.dumps(snapshot)) < DEFAULT_MAX_LINE - 1024
    return ColdWorld(list(names), records, rulesets, snapshot if fits else None)


def clean_tables(view: KernelView, world: ColdWorld, deadline: Deadline) -> None:
    """Every namespace back to empty, checked, so both methods start from the same kernel state."""
    for path in world.paths():
        deadline.check("cleaning tables")
        view.remove(path)
        if view.table_handle(path) is not None:
            raise RuntimeError(f"{path}: table still there after delete")


def check_fingerprints(view: KernelView, world: ColdWorld, who: str, deadline: Deadline) -> None:
    for path, rs in zip(world.paths(), world.rulesets, strict=True):
        deadline.check("verification")
        if (fp := view.fingerprint(path)) != rs.fingerprint:
            raise RuntimeError(
                f"{path} after {who}: kernel holds fingerprint {fp!r}, expected {rs.fingerprint}"
            )


def run_baseline(world: ColdWorld, files: Path, deadline: Deadline) -> float:
    """What an operator would script: `ip netns exec NS nft -j -f FILE` per sandbox, one after another."""
    files.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for name, rs in zip(world.names, world.rulesets, strict=True):
        deadline.check("baseline")
        baseline_apply(name, rs, files / f"{name}.json", deadline)
    return time.perf_counter() - t0


def handles(view: KernelView, world: ColdWorld, deadline: Deadline) -> dict[str, int | None]:
    out = {}
    for path in world.paths():
        deadline.check("handle check")
        out[path] = view.table_handle(path)
    return out


def cli_sample(world: ColdWorld) -> list[str]:
    step = max(1, len(world.names) // CLI_SAMPLE)
    return world.names[::step][:CLI_SAMPLE]


def write_feed(agent: AgentProcess, world: ColdWorld) -> None:
    """The feed file a cold start reads before applying anything: one snapshot, or upserts if too long."""
    if world.feed_line is not None:
        agent.send(world.feed_line)
    else:
        agent.send(*({"type": "upsert", "sandbox": r} for r in world.records))


def start_agent(
    agent: AgentProcess, world: ColdWorld, deadline: Deadline, where: str
) -> tuple[float, float, list[dict[str, Any]]]:
    """Start the agent and time it from just before the process is spawned until all N are enforced."""
    tail = rotate_log(agent)
    t0 = time.perf_counter()
    agent.start(wait_ready=False)
    ready, done, rows = wait_started(agent, tail, world.expected, deadline, where)
    return ready - t0, done - t0, rows


def bench_cold(
    rep: ColdRepeat,
    world: ColdWorld,
    workdir: Path,
    view: KernelView,
    extra: str,
    deadline: Deadline,
    wrap: list[str] | None = None,
    baseline: bool = True,
) -> None:
    """Figures 3 and 4: baseline, cold start from empty namespaces, SIGKILL, restart adopting everything.
    wrap: the agent's command prefix (bench.agent_writes, --writes); baseline=False: no baseline loop."""
    clean_tables(view, world, deadline)
    if baseline:
        rep.baseline_s = run_baseline(world, workdir / "baseline", deadline)
        check_fingerprints(view, world, "baseline", deadline)
        clean_tables(view, world, deadline)

    agent = AgentProcess(workdir / "agent", resync_interval=RESYNC_S, extra_config=extra, wrap=wrap)
    try:
        write_feed(agent, world)
        rep.cold_ready_s, rep.cold_s, rows = start_agent(agent, world, deadline, "cold start")
        assert agent.proc is not None
        rep.cold_proc = proc_figures(agent.proc.pid)
        rep.cold_writes = sum(r["writes"] for r in rows if r["id"] in world.expected)
        check_fingerprints(view, world, "cold start", deadline)
        before = handles(view, world, deadline)
        sample = cli_sample(world)
        cli_before = {n: cli_handle(n, deadline) for n in sample}

        agent.kill()  # SIGKILL: no clean shutdown, the tables stay and the next process must adopt them
        rep.restart_ready_s, rep.restart_s, rows = start_agent(agent, world, deadline, "restart")
        assert agent.proc is not None
        rep.restart_proc = proc_figures(agent.proc.pid)
        mine = [r for r in rows if r["id"] in world.expected]
        rep.restart_writes = sum(r["writes"] for r in mine)
        rep.restart_rows_written = sum(1 for r in mine if r["writes"])
        info = request(agent.socket, {"cmd": "status"}, timeout=deadline.timeout("restart"))["agent"]
        rep.restart_reconciles = dict(info.get("reconciles", {}))
        after = handles(view, world, deadline)
        rep.handles_checked = len(after)
        rep.handles_changed = sum(1 for p in after if after[p] is None or after[p] != before[p])
        cli_after = {n: cli_handle(n, deadline) for n in sample}
        rep.cli_checked = len(sample)
        rep.cli_changed = sum(1 for n in sample if cli_after[n] is None or cli_after[n] != cli_before[n])
        check_fingerprints(view, world, "restart", deadline)
        rep.verified = True
    finally:
        agent.stop()


def bench_profile(
    world: ColdWorld, workdir: Path, view: KernelView, extra: str, deadline: Deadline
) -> dict[str, str]:
    """One extra cold start and restart with the agent profiled (all threads); stopped with SIGTERM, since
    the profile is written at exit, so the restart here follows a clean stop rather than a SIGKILL."""
    clean_tables(view, world, deadline)
    out: dict[str, str] = {}
    agent = ProfiledAgent(
        workdir / "profiled", workdir / "cold.prof", resync_interval=RESYNC_S, extra_config=extra
    )
    try:
        write_feed(agent, world)
        for phase in ("cold", "restart"):
            agent.profile_out = workdir / f"{phase}.prof"
            _, done, rows = start_agent(agent, world, deadline, f"profiled {phase}")
            agent.stop()
            writes = sum(r["writes"] for r in rows if r["id"] in world.expected)
            head = f"{phase}: all enforced after {done:.2f} s under the profiler, {writes} rule writes\n"
            out[phase] = head + top_functions(agent.profile_out)
    finally:
        agent.stop()
    return out


def top_functions(path: Path, count: int = 20) -> str:
    text = io.StringIO()
    stats = pstats.Stats(str(path), stream=text)
    stats.sort_stats("tottime").print_stats(count)
    stats.sort_stats("cumulative").print_stats(count)
    return text.getvalue()


# --- reporting -----------------------------------------------------------------------------------------


def _med(values: Sequence[float | int | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def rows_for(
    lat: LatencyResult, reps: Sequence[ColdRepeat], n: int, storm_events: int, storm_sandboxes: int
) -> list[Row]:
    rows: list[Row] = []
    for label, samples in (("idle", lat.idle), ("storm", lat.storm)):
        k = quantiles([s.kernel_ms for s in samples])
        w = quantiles([s.wait_ms for s in samples])
        for q in ("p50", "p99", "max"):
            goal, met = "", None
            if label == "idle" and q == "p99" and k[q] is not None:
                goal, met = f"<{IDLE_P99_GOAL_MS:g} ms", k[q] < IDLE_P99_GOAL_MS
            rows.append(
                Row(f"latency {label} ({k['n']}), feed -> kernel {q} ms", k[q], None, False, goal, met)
            )
        for q in ("p50", "p99", "max"):
            rows.append(Row(f"latency {label} ({w['n']}), feed -> wait answer {q} ms", w[q], None))
    rounds = lat.storm_rounds
    rows.append(
        Row(
            f"storm: {storm_events} events to {storm_sandboxes} sandboxes, s (median of {len(rounds)})",
            _med([r.seconds for r in rounds]),
            None,
        )
    )
    rows.append(
        Row("storm: events/s until all enforced (median)", _med([r.events / r.seconds for r in rounds]), None)
    )
    base = _med([r.baseline_s for r in reps])  # one baseline loop per repeat, whichever agents ran
    modes = list(dict.fromkeys(r.writes for r in reps))
    others: list[Row] = []  # --writes both: the first mode's rows as always, then the other's cold start
    for mode in modes[1:]:
        other = [r for r in reps if r.writes == mode]
        m = f"median of {len(other)}, {mode} writes"
        cold = _med([r.cold_s for r in other])
        others.append(Row(f"cold start N={n}: start -> all enforced, s ({m})", cold, base, True))
        others.append(
            Row(f"restart N={n}: start -> all enforced, s ({m})", _med([r.restart_s for r in other]), None)
        )
    reps = [r for r in reps if r.writes == modes[0]] if modes else reps
    cold = _med([r.cold_s for r in reps])
    m = f"median of {len(reps)}" + (f", {modes[0]} writes" if len(modes) > 1 else "")
    rows.append(
        Row(
            f"cold start N={n}: start -> all enforced, s ({m})",
            cold,
            base,
            True,
            f"<{COLD_GOAL_S:g} s",
            None if cold is None else cold < COLD_GOAL_S,
        )
    )
    rows.append(
        Row(f"  cold start: start -> ready logged, s ({m})", _med([r.cold_ready_s for r in reps]), None)
    )
    restart = _med([r.restart_s for r in reps])
    restart_goal = None if restart is None else restart < RESTART_GOAL_S
    rows.append(
        Row(
            f"restart N={n}: start -> all enforced, s ({m})",
            restart,
            None,
            False,
            f"<{RESTART_GOAL_S:g} s",
            restart_goal,
        )
    )
    rows.append(
        Row(f"  restart: start -> ready logged, s ({m})", _med([r.restart_ready_s for r in reps]), None)
    )
    done = [r for r in reps if r.restart_writes is not None]
    writes = sum(r.restart_writes or 0 for r in done) if done else None
    changed = sum((r.handles_changed or 0) + (r.cli_changed or 0) for r in done) if done else None
    rows.append(
        Row(
            "restart: rule writes (status, all repeats)",
            writes,
            None,
            False,
            "0",
            None if writes is None else writes == 0,
        )
    )
    rows.append(
        Row(
            f"restart: table handles changed ({sum(r.handles_checked + r.cli_checked for r in done)} seen)",
            changed,
            None,
            False,
            "0",
            None if changed is None else changed == 0,
        )
    )
    for phase in ("cold", "restart"):
        rss = _med([getattr(r, f"{phase}_proc").get("vmrss_kib") for r in reps])
        hwm = _med([getattr(r, f"{phase}_proc").get("vmhwm_kib") for r in reps])
        fds = _med([getattr(r, f"{phase}_proc").get("fds") for r in reps])
        rows.append(Row(f"agent after {phase} at N={n}: RSS MiB", None if rss is None else rss / 1024, None))
        rows.append(Row("  peak RSS MiB (VmHWM)", None if hwm is None else hwm / 1024, None))
        rows.append(Row("  open file descriptors", fds, None))
    rows += others
    return rows


def _num(v: float | None) -> str:
    """Counts print as counts; everything else as bench.apply prints it."""
    return str(v) if isinstance(v, int) else _fmt(v)


def table(rows: Sequence[Row]) -> str:
    head = f"{'figure':<66} {'egressd':>9} {'baseline':>9} {'ratio':>7}  {'goal':<9} met?"
    lines = [head, "-" * len(head)]
    for row in rows:
        ratio = f"{row.baseline / row.egressd:.1f}x" if row.ratio and row.egressd and row.baseline else ""
        met = "" if row.met is None else ("yes" if row.met else "NO")
        lines.append(
            f"{row.figure:<66} {_num(row.egressd):>9} {_num(row.baseline):>9} {ratio:>7}  "
            f"{row.goal:<9} {met}".rstrip()
        )
    return "\n".join(lines)


def workdir_fs(path: Path) -> str:
    """The filesystem the state file lives on: its fsync is part of every update's latency."""
    best, kind = "", "unknown"
    for line in Path("/proc/mounts").read_text().splitlines():
        parts = line.split()
        if len(parts) > 2 and str(path).startswith(parts[1]) and len(parts[1]) > len(best):
            best, kind = parts[1], parts[2]
    return kind


def to_json(
    args: argparse.Namespace,
    info: dict[str, Any],
    lat: LatencyResult,
    reps: Sequence[ColdRepeat],
    rows: Sequence[Row],
    profile: dict[str, str],
    wall: float,
    aborted: str | None,
    errors: Sequence[str],
) -> dict[str, Any]:
    done = [r for r in reps if r.verified]
    return {
        "machine": info,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "goals": {"idle_p99_ms": IDLE_P99_GOAL_MS, "cold_start_s": COLD_GOAL_S, "restart_s": RESTART_GOAL_S},
        "wall_seconds": wall,
        "aborted": aborted,
        "errors": list(errors),
        "latency": {
            "idle": {
                "kernel_ms": quantiles([s.kernel_ms for s in lat.idle]),
                "wait_ms": quantiles([s.wait_ms for s in lat.idle]),
                "samples": [asdict(s) for s in lat.idle],
            },
            "storm": {
                "kernel_ms": quantiles([s.kernel_ms for s in lat.storm]),
                "wait_ms": quantiles([s.wait_ms for s in lat.storm]),
                "samples": [asdict(s) for s in lat.storm],
                "samples_between_rounds_dropped": lat.storm_outside,
                "rounds": [
                    asdict(r) | {"seconds": r.seconds, "events_per_s": r.events / r.seconds}
                    for r in lat.storm_rounds
                ],
                "error": lat.storm_error,
            },
            "commit_notification_overflows": lat.commit_overflows,
        },
        "cold_start": {"repeats": [asdict(r) for r in reps]},
        "restart": {
            "repeats_verified": len(done),
            "zero_writes": bool(done) and all(r.restart_writes == 0 for r in done),
            "handles_unchanged": bool(done)
            and all(r.handles_changed == 0 and r.cli_changed == 0 for r in done),
        },
        "table": [asdict(r) for r in rows],
        "profile": profile,
    }


def summary(results: dict[str, Any]) -> list[Figure]:
    """Headline figures of a `--json` result for `python -m bench`: event-to-kernel latency idle and in the
    storm, cold start against the `nft -j -f` loop of the same repeats, restart time and rule writes."""
    goals = results.get("goals", {})
    idle_goal = goals.get("idle_p99_ms", IDLE_P99_GOAL_MS)
    cold_goal = goals.get("cold_start_s", COLD_GOAL_S)
    restart_goal = goals.get("restart_s", RESTART_GOAL_S)
    settings = results.get("settings", {})
    n = settings.get("sandboxes", 0)
    storm_events = settings.get("storm_events", 0)
    lat = results.get("latency", {})
    figures: list[Figure] = []
    for label in ("idle", "storm"):
        k = lat.get(label, {}).get("kernel_ms", {})
        for q in ("p50", "p99"):
            value = k.get(q)
            goal, met = None, None
            if label == "idle" and q == "p99":
                goal, met = f"< {idle_goal:g} ms", None if value is None else value < idle_goal
            where = "idle" if label == "idle" else f"during {storm_events:,}-event storms"
            figures.append(
                Figure(
                    "agent",
                    f"event -> enforced (kernel), {where}, {q}",
                    "ms",
                    value,
                    goal=goal,
                    met=met,
                    note=f"{k.get('n', 0)} updates",
                )
            )
    rounds = lat.get("storm", {}).get("rounds", [])
    if rounds:
        rate = _med([r["events_per_s"] for r in rounds])
        figures.append(
            Figure("agent", "storm throughput, events/s", "events/s", rate, lower_is_better=False,
                   note=f"median of {len(rounds)} rounds")
        )  # fmt: skip
    every = results.get("cold_start", {}).get("repeats", [])
    first = every[0].get("writes", "raw") if every else "raw"
    reps = [r for r in every if r.get("writes", "raw") == first]  # --writes both: the agent as shipped
    m = f"median of {len(reps)} repeats"
    cold = _med([r.get("cold_s") for r in reps])
    figures.append(
        Figure(
            "agent",
            f"cold start, {n:,} sandboxes, start -> all enforced",
            "s",
            cold,
            _med([r.get("baseline_s") for r in every]),
            "ip netns exec NS nft -j -f FILE, each sandbox in turn",
            f"< {cold_goal:g} s",
            None if cold is None else cold < cold_goal,
            note=m,
        )
    )
    restart = _med([r.get("restart_s") for r in reps])
    figures.append(
        Figure(
            "agent",
            f"restart adopting {n:,} unchanged sandboxes",
            "s",
            restart,
            goal=f"< {restart_goal:g} s",
            met=None if restart is None else restart < restart_goal,
            note=m,
        )
    )
    done = [r for r in reps if r.get("restart_writes") is not None]
    writes = sum(r["restart_writes"] for r in done) if done else None
    changed = (
        sum((r.get("handles_changed") or 0) + (r.get("cli_changed") or 0) for r in done) if done else None
    )
    figures.append(
        Figure(
            "agent",
            "restart: rule writes, all repeats",
            "writes",
            writes,
            goal="0",
            met=None if writes is None else writes == 0,
            note=None if changed is None else f"table handles changed: {changed}",
        )
    )
    rss = _med([r.get("cold_proc", {}).get("vmrss_kib") for r in reps])
    figures.append(
        Figure(
            "agent",
            f"agent RSS after cold start, {n:,} sandboxes",
            "MB",
            None if rss is None else rss * 1024 / 1e6,
            note="decimal MB; the memory goal is judged on bench.dns (with hostnames)",
        )
    )
    return figures


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.agent", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=1000, metavar="N", help="cold start/restart size (1000)")
    p.add_argument("--repeats", type=int, default=3, metavar="R", help="cold start/restart repeats (3)")
    p.add_argument(
        "--updates", type=int, default=200, metavar="M", help="probe updates, idle and storm (200)"
    )
    p.add_argument("--storm-events", type=int, default=1000, help="events per storm round (1000)")
    p.add_argument("--storm-sandboxes", type=int, default=100, help="sandboxes the storm writes to (100)")
    p.add_argument("--storm-seconds", type=float, default=120.0, help="bound on the storm phase (120)")
    p.add_argument("--gap-ms", type=float, default=60.0, help="pause between probe updates (60)")
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (default 600)")
    p.add_argument("--json", type=Path, metavar="OUT", help="also write all figures and machine info here")
    p.add_argument("--profile", action="store_true", help="one extra cold start + restart, agent profiled")
    p.add_argument("--workers", type=int, metavar="W", help="[reconcile] workers (default: the agent's)")
    p.add_argument("--keep-workdir", action="store_true", help="keep agent logs and state for a look after")
    p.add_argument("--smoke", action="store_true", help="N=20, M=20, storm 50 events, R=1: seconds")
    p.add_argument(
        "--writes",
        choices=("raw", "libnftables", "both"),
        default="raw",
        help="how the cold start's agents write sandbox tables: raw netlink (as shipped), libnftables "
        "(as before issue 19), or both alternately in each repeat (default raw)",
    )
    p.add_argument("--skip-latency", action="store_true", help="only the cold start and restart")
    args = p.parse_args(argv)
    if args.smoke:
        args.sandboxes, args.updates, args.repeats = 20, 20, 1
        args.storm_events, args.storm_sandboxes, args.storm_seconds = 50, 10, 20.0
    positive = (args.sandboxes, args.repeats, args.updates, args.storm_events, args.storm_sandboxes)
    if args.workers is not None and args.workers < 1:
        p.error("--workers must be at least 1")
    if min(positive) < 1 or args.max_seconds <= 0 or args.storm_seconds <= 0 or args.gap_ms < 0:
        p.error("counts, --max-seconds and --storm-seconds must be positive, --gap-ms not negative")
    return args


def agent_extra(args: argparse.Namespace) -> str:
    """Lines for the agent's [reconcile] section (AgentProcess appends extra_config there)."""
    return "" if args.workers is None else f"workers = {args.workers}\n"


@contextlib.contextmanager
def phase_errors(errors: list[str], phase: str) -> Iterator[None]:
    """A failed check or a dead agent ends this phase, recorded; an abort (deadline, SIGTERM) ends the run."""
    try:
        yield
    except (RuntimeError, OSError, ControlError) as e:
        errors.append(f"{phase}: {type(e).__name__}: {e}")


def ensure_fd_limit(n: int) -> str | None:
    """The agent holds two descriptors per sandbox (namespace and netlink socket), and so does this
    process's kernel view; raise the soft limit if it is too low, and say so."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 2 * n + 1024
    if soft != resource.RLIM_INFINITY and soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        return f"raised RLIMIT_NOFILE soft limit from {soft} to {new} (the agent inherits it)"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """0 when the run completed (goals are reported, not enforced); 1 when a check failed; 2 when it could
    not run or was aborted."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--profile-agent"] and len(argv) > 2:
        return profile_agent(Path(argv[1]), argv[2:])
    args = parse_args(argv)
    if not began("agent"):
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    info = machine_info()
    note = ensure_fd_limit(args.sandboxes)
    lat = LatencyResult()
    reps: list[ColdRepeat] = []
    profile: dict[str, str] = {}
    aborted: str | None = None
    errors: list[str] = []
    namespaces = BatchNamespaces()
    view: KernelView | None = None
    work: Path | None = None
    try:
        with contextlib.ExitStack() as stack:
            work = Path(tempfile.mkdtemp(prefix="egressd-bench-agent-"))
            if not args.keep_workdir:  # agents are stopped by then: each phase stops its own in finally
                stack.callback(shutil.rmtree, work, ignore_errors=True)
            info["workdir_fs"] = workdir_fs(work)
            probe = namespaces.create_named(["p0"], deadline)[0]
            storm = namespaces.create_named([f"s{i}" for i in range(args.storm_sandboxes)], deadline)
            cold = namespaces.create_named([f"c{i}" for i in range(args.sandboxes)], deadline)
            # Each phase has agents of its own, so one that fails (an agent that dies) is reported and the
            # next phase still runs; the exit status says that something failed.
            if args.skip_latency:  # only its config file, for the fingerprints below
                AgentProcess(work / "latency", resync_interval=RESYNC_S, extra_config=agent_extra(args))
            else:
                with phase_errors(errors, "latency"):
                    bench_latency(lat, work / "latency", probe, storm, args, deadline)
            # The agents' own config file, so the expected fingerprints are rendered exactly as theirs are.
            world = make_cold_world(cold, load_config(str(work / "latency" / "egressd.toml"), {}))
            view = KernelView(cache=False)
            modes = ["raw", "libnftables"] if args.writes == "both" else [args.writes]
            for r in range(args.repeats):
                for i, mode in enumerate(modes if r % 2 == 0 else modes[::-1]):  # alternately first
                    reps.append(ColdRepeat(writes=mode))
                    wrap = (
                        None
                        if args.writes == "raw"
                        else [sys.executable, "-m", "bench.agent_writes", mode, "--"]
                    )
                    with phase_errors(errors, f"cold start/restart repeat {r + 1} ({mode} writes)"):
                        bench_cold(
                            reps[-1],
                            world,
                            work / f"cold{r}{mode}",
                            view,
                            agent_extra(args),
                            deadline,
                            wrap,
                            i == 0,
                        )
            if args.profile:
                with phase_errors(errors, "profile"):
                    profile = bench_profile(world, work, view, agent_extra(args), deadline)
    except Aborted as e:
        aborted = str(e)
    except KeyboardInterrupt as e:
        aborted = f"interrupted ({e or 'SIGINT'})"
    except (RuntimeError, OSError, ControlError) as e:  # setup: namespaces, work dir
        errors.append(f"setup: {type(e).__name__}: {e}")
    finally:
        if view is not None:
            view.close()
        for line in namespaces.delete():
            print(f"bench.agent: could not delete namespace {line}", file=sys.stderr)
    wall = time.monotonic() - started

    rows = rows_for(lat, reps, args.sandboxes, args.storm_events, args.storm_sandboxes)
    print(
        f"egressd agent benchmark: latency = ms from writing an event to the feed socket until the kernel "
        f"commit putting it in force (NEWGEN) / until the agent's `wait` answers; cold start and restart "
        f"= s from spawning `egressd run` until status shows all {args.sandboxes} enforced"
    )
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}, "
        f"state dir on {info.get('workdir_fs', '?')}; agent [reconcile] workers = "
        f"{args.workers or Config().workers}{'' if args.workers else ' (default)'}"
        + (f"; {note}" if note else "")
    )
    print()
    print(table(rows))
    for text in profile.values():
        print()
        print(text)
    status = f"ABORTED: {aborted}" if aborted else (f"{len(errors)} FAILED" if errors else "complete")
    print()
    for e in errors:
        print(f"FAILED {e}")
    print(f"wall time {wall:.1f} s ({status}); repeats verified: {sum(r.verified for r in reps)}/{len(reps)}")
    if args.keep_workdir and work is not None:
        print(f"agent logs and state kept in {work}")
    if args.json:
        doc = to_json(args, info, lat, reps, rows, profile, wall, aborted, errors)
        args.json.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    if aborted:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
