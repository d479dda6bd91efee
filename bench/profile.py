"""Where the agent's time goes: cold start and restart at N sandboxes under py-spy, every thread sampled.

bench.agent's `--profile` uses cProfile, which costs every Python call and cannot see GIL waits; py-spy
samples the stacks from outside, so native calls and threads waiting for the GIL show as they are. Run as
root from the project root: `python -m bench.profile` (see bench/README.md). Timings under py-spy are slower
than the agent's own and are not the benchmark's figures.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from bench.agent import (
    RESYNC_S,
    BatchNamespaces,
    ColdWorld,
    ensure_fd_limit,
    make_cold_world,
    start_agent,
    write_feed,
)
from bench.apply import Aborted, Deadline, began, machine_info
from egressd.agent.control import ControlError
from egressd.model.config import load_config
from tests.integration.agent import AgentProcess

ROOT = Path(__file__).resolve().parent.parent
PY_SPY = ROOT / ".venv" / "bin" / "py-spy"
SPY_EXIT_S = 30.0  # py-spy writes its file after SIGINT; a large profile takes a moment
AGENT_EXIT_S = 10.0
FRAME_WIDTH = 150
# Absolute paths in frames shortened to the package (as /tmp/prof/agg.py did): the prefix is noise.
_PATH_PREFIX = re.compile(r" \(/.*?/(egressd|bench|dist-packages|site-packages|python3\.\d+)/")
_THREAD = re.compile(r"thread \((\d+)\)(?:: (.*))?$")


# --- aggregation (pure: unit-tested without root) -----------------------------------------------------


@dataclass
class Samples:
    """py-spy's raw (collapsed) stacks, counted: per thread, by self frame and by inclusive frame."""

    total: int = 0
    threads: collections.Counter[str] = field(default_factory=collections.Counter)
    self_frames: collections.Counter[str] = field(default_factory=collections.Counter)
    inclusive: collections.Counter[str] = field(default_factory=collections.Counter)
    skipped: int = 0  # lines that are not `stack count`


def short_frame(frame: str) -> str:
    return _PATH_PREFIX.sub(r" (\1/", frame)


def parse_raw(raw_text: str) -> Samples:
    """One line per distinct stack: `thread (TID)[: NAME];outer (file:line);...;inner (file:line) COUNT`.

    py-spy names a thread only once it knows the name, so one thread can appear with and without it: the
    samples are counted per thread id, under the name when any line gives one.
    """
    s = Samples()
    by_tid: collections.Counter[str] = collections.Counter()
    names: dict[str, str] = {}
    for line in raw_text.splitlines():
        stack, _, count = line.strip().rpartition(" ")
        if not stack or not count.isdigit():
            s.skipped += bool(line.strip())
            continue
        n = int(count)
        s.total += n
        frames = stack.split(";")
        m = _THREAD.match(frames[0])
        if m:
            tid = m.group(1)
            if m.group(2):
                names[tid] = m.group(2)
            frames = frames[1:]
        else:
            tid = "?"
        by_tid[tid] += n
        short = [short_frame(f) for f in frames]
        if short:
            s.self_frames[short[-1]] += n
        for f in set(short):  # a recursive frame counts once per sample
            s.inclusive[f] += n
    for tid, n in by_tid.items():
        label = "no thread id" if tid == "?" else f"thread {tid}"
        s.threads[f"{label}: {names[tid]}" if tid in names else label] += n
    return s


def summarize(raw_text: str, top: int) -> str:
    """Samples per thread, then the top frames by self samples and by inclusive samples."""
    s = parse_raw(raw_text)
    out = [f"total samples {s.total}" + (f" ({s.skipped} unreadable lines skipped)" if s.skipped else "")]

    def row(n: int, name: str) -> str:
        return f"{n:7d} {100.0 * n / s.total if s.total else 0.0:5.1f}%  {name[:FRAME_WIDTH]}"

    def block(title: str, counts: collections.Counter[str], k: int) -> None:
        out.append(f"--- {title}")
        out.extend(row(n, name) for name, n in counts.most_common(k))

    # Short-lived threads would bury the long-lived ones: the top K, then the rest in one line.
    block("samples per thread", s.threads, top)
    rest = s.threads.most_common()[top:]
    if rest:
        out.append(row(sum(n for _, n in rest), f"({len(rest)} other threads)"))
    block(f"top {top} frames by self samples", s.self_frames, top)
    block(f"top {top} frames by inclusive samples", s.inclusive, top)
    return "\n".join(out)


# --- the agent under py-spy -----------------------------------------------------------------------------


def spy_command(out: Path, rate: int, idle: bool = False) -> list[str]:
    """`--threads` labels every stack with its thread; raw is the collapsed format summarize() reads.

    `idle`: py-spy's --idle, which keeps samples of threads blocked in the kernel (sleeping, waiting on a
    queue or, often, for the GIL); without it py-spy drops them.
    """
    cmd = [str(PY_SPY), "record", "-r", str(rate), "--threads", "-f", "raw", "-o", str(out)]
    return [*cmd, *(["--idle"] if idle else []), "--"]


def children(pid: int) -> list[int]:
    """Child pids of `pid`, from every one of its threads (a child belongs to the thread that forked it)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the pid, it names one process, so a reused pid is never signalled."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rpartition(")")[2].split()[19]


def alive(pid: int, started: str) -> bool:
    """Still the same process and not a zombie (an orphan's zombie may never be reaped in a container)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    fields = stat.rpartition(")")[2].split()
    return fields[19] == started and fields[0] != "Z"


@dataclass(frozen=True)
class Child:
    pid: int
    started: str


def agent_under(spy_pid: int, wait_s: float = 5.0) -> Child | None:
    """The agent is py-spy's child, not ours: found in /proc, never by a pattern over all processes."""
    end = time.monotonic() + wait_s
    while True:
        for pid in children(spy_pid):
            started = start_time(pid)
            if started is not None:
                return Child(pid, started)
        if time.monotonic() >= end:
            return None
        time.sleep(0.05)


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def end_child(child: Child, sig: int) -> str | None:
    """Signal the orphaned agent, then SIGKILL it if it outlives AGENT_EXIT_S; returns a note if it had to."""
    if not alive(child.pid, child.started):
        return None
    os.kill(child.pid, sig)
    end = time.monotonic() + AGENT_EXIT_S
    while time.monotonic() < end:
        if not alive(child.pid, child.started):
            return None
        time.sleep(0.05)
    if alive(child.pid, child.started):
        os.kill(child.pid, signal.SIGKILL)
        end = time.monotonic() + 5
        while alive(child.pid, child.started) and time.monotonic() < end:
            time.sleep(0.05)
        return f"agent {child.pid} ignored signal {sig} for {AGENT_EXIT_S:g} s: killed"
    return None


def stop_spied(agent: AgentProcess, sig: int = signal.SIGTERM) -> list[str]:
    """SIGINT to py-spy so it writes its file (it leaves the agent running), then `sig` to the agent."""
    notes: list[str] = []
    spy = agent.proc
    if spy is None:
        return notes
    child = agent_under(spy.pid, wait_s=0.5) if spy.poll() is None else None
    if spy.poll() is None:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(SPY_EXIT_S)
        except subprocess.TimeoutExpired:
            notes.append(f"py-spy still running {SPY_EXIT_S:g} s after SIGINT: killed, file may be missing")
            spy.kill()
            spy.wait(5)
    agent.proc = None
    if child is not None:
        note = end_child(child, sig)
        if note:
            notes.append(note)
    return notes


@dataclass
class Phase:
    name: str
    ready_s: float
    done_s: float
    mem_kib: dict[str, int]
    raw: Path
    notes: list[str]

    def head(self, n: int, rate: int, idle: bool) -> str:
        rss, hwm = self.mem_kib.get("VmRSS"), self.mem_kib.get("VmHWM")
        mb = "?" if rss is None else f"{rss / 1024:.1f} MiB"
        peak = "?" if hwm is None else f"{hwm / 1024:.1f} MiB"
        lines = [
            f"== {self.name}: all {n} enforced {self.done_s:.2f} s after spawn (ready {self.ready_s:.2f} s), "
            f"under py-spy at {rate} Hz" + (" (--idle)" if idle else ""),
            f"agent VmRSS {mb}, VmHWM {peak} when all were enforced; raw stacks in {self.raw}",
        ]
        return "\n".join(lines + [f"note: {x}" for x in self.notes])


def profiled_start(
    agent: AgentProcess, world: ColdWorld, name: str, args: argparse.Namespace, deadline: Deadline, sig: int
) -> Phase:
    """One start of the agent under py-spy, timed from spawn to all enforced, then py-spy stopped."""
    raw = args.out / f"{name}.txt"
    raw.unlink(missing_ok=True)  # an old file must not pass for this run's
    agent.wrap = spy_command(raw, args.rate, args.idle)
    notes: list[str] = []
    mem: dict[str, int] = {}
    try:
        ready, done, _ = start_agent(agent, world, deadline, f"{name} under py-spy")
        assert agent.proc is not None
        child = agent_under(agent.proc.pid)
        if child is None:
            notes.append("agent process not found under py-spy: no memory figures")
        else:
            mem = memory(child.pid)
    finally:
        notes += stop_spied(agent, sig)
        agent.wrap = []
    if not raw.exists():
        raise RuntimeError(f"py-spy wrote no {raw}")
    return Phase(name, ready, done, mem, raw, notes)


def report(phase: Phase, args: argparse.Namespace) -> None:
    """Print the phase and write DIR/<phase>.summary.txt, as soon as the phase is done."""
    head = phase.head(args.sandboxes, args.rate, args.idle)
    text = head + "\n" + summarize(phase.raw.read_text(), args.top)
    print(text + "\n", flush=True)
    (args.out / f"{phase.name}.summary.txt").write_text(text + "\n", encoding="utf-8")


def profile_phases(names: Sequence[str], work: Path, args: argparse.Namespace, deadline: Deadline) -> None:
    extra = "".join(line + "\n" for line in args.config_line)
    agent = AgentProcess(work / "agent", resync_interval=RESYNC_S, extra_config=extra)
    try:
        # The agent's own config file, so the expected fingerprints are rendered exactly as its are.
        world = make_cold_world(names, load_config(str(agent.config_path), {}))
        write_feed(agent, world)
        if args.phase in ("cold", "both"):
            # A restart must follow a crash, so then the cold agent is SIGKILLed rather than stopped.
            sig = signal.SIGKILL if args.phase == "both" else signal.SIGTERM
            report(profiled_start(agent, world, "cold", args, deadline, sig), args)
        else:
            _, done, _ = start_agent(agent, world, deadline, "cold start (not profiled)")
            print(f"cold start (not profiled): all {args.sandboxes} enforced after {done:.2f} s", flush=True)
            agent.kill()  # SIGKILL: the tables stay, and the next agent must adopt them
        if args.phase in ("restart", "both"):
            report(profiled_start(agent, world, "restart", args, deadline, signal.SIGTERM), args)
    finally:
        if agent.proc is not None and agent.wrap:  # an abort mid-phase, the agent still under py-spy
            for note in stop_spied(agent):
                print(f"bench.profile: {note}", file=sys.stderr)
        agent.stop()


# --- command line --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    p.add_argument("--sandboxes", type=int, default=1000, metavar="N", help="sandboxes (1000)")
    p.add_argument("--phase", choices=("cold", "restart", "both"), default="both", help="what to profile")
    p.add_argument("--out", type=Path, metavar="DIR", help="py-spy files and summaries (default: a temp dir)")
    p.add_argument("--rate", type=int, default=200, metavar="HZ", help="py-spy samples per second (200)")
    p.add_argument("--top", type=int, default=25, metavar="K", help="frames listed by self/inclusive (25)")
    p.add_argument(
        "--config-line",
        action="append",
        default=[],
        metavar="'KEY = VALUE'",
        help="appended to the agent's [reconcile] section (repeatable), e.g. 'cached_contexts = 8'",
    )
    p.add_argument("--idle", action="store_true", help="py-spy --idle: keep samples of blocked threads too")
    p.add_argument("--max-seconds", type=float, default=600.0, help="abort cleanly after this (600)")
    args = p.parse_args(argv)
    if args.sandboxes < 1 or args.rate < 1 or args.top < 1 or args.max_seconds <= 0:
        p.error("--sandboxes, --rate, --top and --max-seconds must be positive")
    for line in args.config_line:
        if "=" not in line or "\n" in line:
            p.error(f"--config-line {line!r}: expected one 'key = value' line")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """0 when every phase asked for was profiled; 1 when one failed; 2 when it could not run or aborted."""
    args = parse_args(argv)
    if not began("profile"):
        return 2
    if not PY_SPY.exists():
        print(f"bench.profile: {PY_SPY} not found; install it with `bash scripts/setup.sh`", file=sys.stderr)
        return 2
    started = time.monotonic()
    deadline = Deadline(started + args.max_seconds)
    args.out = args.out or Path(tempfile.mkdtemp(prefix="egressd-profile-"))
    args.out.mkdir(parents=True, exist_ok=True)
    note = ensure_fd_limit(args.sandboxes)
    info = machine_info()
    print(f"bench.profile: {args.sandboxes} sandboxes, phase {args.phase}; output in {args.out}")
    print(
        f"{info['nproc']} CPUs, kernel {info['kernel']}, {info['nft']}, Python {info['python']}; "
        f"[reconcile] extra: {', '.join(args.config_line) or 'none'}" + (f"; {note}" if note else "")
    )
    print(flush=True)
    namespaces = BatchNamespaces()
    work: Path | None = None
    status = 0
    try:
        work = Path(tempfile.mkdtemp(prefix="egressd-profile-work-"))
        names = namespaces.create_named([f"c{i}" for i in range(args.sandboxes)], deadline)
        profile_phases(names, work, args, deadline)
    except Aborted as e:
        print(f"ABORTED: {e}", file=sys.stderr)
        status = 2
    except KeyboardInterrupt as e:
        print(f"ABORTED: interrupted ({e or 'SIGINT'})", file=sys.stderr)
        status = 2
    except (RuntimeError, OSError, ControlError, AssertionError) as e:
        print(f"FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        status = 1
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        for line in namespaces.delete():
            print(f"bench.profile: could not delete namespace {line}", file=sys.stderr)
    print(f"wall time {time.monotonic() - started:.1f} s; files in {args.out}")
    return status


if __name__ == "__main__":
    sys.exit(main())
