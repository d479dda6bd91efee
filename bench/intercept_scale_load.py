"""The open-loop DNS load of bench.intercept_scale: sandboxes made cheaply, one UDP socket in each, a
generator that sends on a schedule whatever the replies do, and the per-step figures.

Why open loop: a client that waits for each reply before the next query slows down with the server, and
its latencies then hide the queue it no longer builds (coordinated omission). Here query k of a step is
sent at start + k / rate, round-robin over the sockets, and replies are collected in between with one
epoll, so a few thousand queries per second fit in one Python process. The latency of a query runs from
its actual send to its reply (the generator's own lag behind the schedule is reported beside it).
"""

from __future__ import annotations

import errno
import os
import resource
import select
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.message

from bench.agent import _commit_socket, _has_newgen, percentile
from bench.apply import Aborted, Deadline
from netns_fixtures import in_netns

SANDBOX_ADDRESS = "192.0.2.1/24"  # on each sandbox's sink interface; nothing behind it answers
SETUP_PARALLEL = 8  # `ip -n NS -batch -` processes at once
INTERSTEP_S = 0.5  # between steps: late replies are drained, the agent catches up
GOAL_P99_MS = 20.0
NOISY_CPUS = 0.5  # CPUs busy elsewhere during a failed step that make it noisy
# One namespace's configuration: loopback (the redirect's target) and a default route out of a sink, so a
# query to any address passes the output hook, where the table redirects it to the proxy. The sink is an ifb
# device, which drops what it is sent (nothing redirected to it by tc) as a dummy would: this machine's
# kernel has no dummy driver.
SANDBOX_LINES = (
    "link set lo up",
    "link add sink0 type ifb",
    f"addr add {SANDBOX_ADDRESS} dev sink0",
    "link set sink0 up",
    "route add default dev sink0",
)


def setup_sandboxes(names: Sequence[str], deadline: Deadline) -> None:
    """A sink interface with an address and a default route in each namespace: cheaper than a veth pair to
    a router each, and enough for interception (nothing but the proxy can answer a query sent out of it)."""
    script = "".join(f"{line}\n" for line in SANDBOX_LINES)
    running: list[tuple[str, subprocess.Popen[str]]] = []
    todo = list(names)
    while todo or running:
        while todo and len(running) < SETUP_PARALLEL:
            ns = todo.pop()
            proc = subprocess.Popen(
                ["ip", "-n", ns, "-batch", "-"],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            assert proc.stdin is not None
            proc.stdin.write(script)
            proc.stdin.close()
            running.append((ns, proc))
        ns, proc = running.pop(0)
        try:
            proc.wait(deadline.timeout("sandbox setup"))
        except subprocess.TimeoutExpired:
            proc.kill()
            raise Aborted(f"ip -n {ns} -batch timed out") from None
        if proc.returncode != 0:
            err = proc.stderr.read() if proc.stderr else ""
            raise RuntimeError(f"setting up {ns} failed: {err.strip()}")


def udp_socket(ns: str, dst: str, port: int = 53) -> socket.socket:
    """A non-blocking UDP socket made inside ns, connected to dst (so only dst's replies reach it)."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        try:
            sock.connect((dst, port))
        except OSError:
            sock.close()
            raise
    return sock


def watch_socket(ns: str) -> socket.socket:
    """Hears every nftables commit in ns (bench.agent's), non-blocking for the generator's epoll."""
    with in_netns(ns):
        sock = _commit_socket()
    sock.setblocking(False)
    return sock


def query_wire(name: str, rdtype: str) -> bytes:
    return dns.message.make_query(name, rdtype).to_wire()


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process so far (this process when pid is None)."""
    if pid is None:
        use = resource.getrusage(resource.RUSAGE_SELF)
        return use.ru_utime + use.ru_stime
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_ticks() -> tuple[int, int, int]:
    """(busy, idle, steal) clock ticks of all CPUs so far (/proc/stat): the load of everything, the agent's
    neighbours and the hypervisor's other guests included."""
    with open("/proc/stat", encoding="ascii") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return user + nice + system + irq + softirq, idle + iowait, steal


def machine_load(before: tuple[int, int, int]) -> dict[str, float]:
    """Since `before`: CPUs busy and stolen, in CPUs (2.0: both busy all along)."""
    after = machine_ticks()
    busy, idle, steal = (a - b for a, b in zip(after, before, strict=True))
    cpus = os.cpu_count() or 1
    total = busy + idle + steal
    return {"busy": round(cpus * busy / total, 3), "steal": round(cpus * steal / total, 3)} if total else {}


def wait_quiet(bound: float, idle_share: float = 0.8, window: float = 0.5) -> dict[str, float]:
    """Until at least idle_share of the CPUs idled over the last window (the kernel frees what the agents
    stopped before left behind: thousands of sockets, namespaces), at most `bound` seconds."""
    t0 = time.monotonic()
    while True:
        before = machine_ticks()
        time.sleep(window)
        load = machine_load(before)
        cpus = os.cpu_count() or 1
        if load.get("busy", 0.0) <= cpus * (1 - idle_share) or time.monotonic() - t0 >= bound:
            return {"waited_s": round(time.monotonic() - t0, 2), **load}


@dataclass
class Tally:
    """One step's counts. `answered`: a reply with rcode NOERROR and at least one answer record within the
    timeout; `wrong`: a reply in time that is not that; everything else sent is unanswered."""

    sent: int = 0
    answered: int = 0
    wrong: int = 0
    late: int = 0
    stray: int = 0
    send_errors: int = 0
    recv_errors: int = 0
    sample_sent: int = 0
    writes: int = 0
    latencies: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)


class Generator:
    """Open-loop UDP load over a fixed list of sockets; `watch` are commit sockets of some of the sandboxes
    behind them (`sampled`: their indexes), so kernel writes per query can be counted without a thread."""

    def __init__(
        self, socks: Sequence[socket.socket], watch: Sequence[socket.socket] = (), sampled: Sequence[int] = ()
    ) -> None:
        self.socks = list(socks)
        self.watch = list(watch)
        self.sampled = set(sampled)
        self.position = 0  # round-robin across steps: each step goes on where the last one stopped
        self.qid = 0
        self.epoll = select.epoll()
        self.by_fd: dict[int, tuple[int, socket.socket]] = {}  # fd -> (socket index or -1: a watcher, socket)
        for i, s in [*enumerate(self.socks), *((-1, w) for w in self.watch)]:
            self.epoll.register(s.fileno(), select.EPOLLIN)
            self.by_fd[s.fileno()] = (i, s)

    def close(self) -> None:
        self.epoll.close()
        for s in (*self.socks, *self.watch):
            s.close()

    def step(self, wire: bytes, rate: float, seconds: float, timeout: float, deadline: Deadline) -> Tally:
        """`rate` queries per second for `seconds`, then up to `timeout` for the last replies (the caller
        pauses before the next step)."""
        total, interval = max(1, round(rate * seconds)), 1.0 / rate
        pending: dict[tuple[int, int], float] = {}
        tally = Tally()
        start = time.monotonic() + 0.01
        k = 0
        while True:
            now = time.monotonic()
            while k < total and start + k * interval <= now:
                self._send(wire, now - (start + k * interval), pending, tally)
                k += 1
            if k < total:
                wait = start + k * interval - now
            elif pending and now < start + (total - 1) * interval + timeout:
                wait = 0.005
            else:
                break
            self._collect(wait, pending, tally, timeout)
            if k % 512 == 0:
                deadline.check("a load step")
        return tally

    def pause(self, seconds: float) -> None:
        """Read whatever comes for a while (replies too late to count, commits) and count nothing."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self._collect(left, {}, Tally(), 0.0)

    def _send(self, wire: bytes, lag: float, pending: dict[tuple[int, int], float], tally: Tally) -> None:
        idx = self.position % len(self.socks)
        self.position += 1
        self.qid = (self.qid + 1) & 0xFFFF
        tally.sent += 1
        tally.sample_sent += idx in self.sampled
        tally.lags.append(lag)
        try:
            self.socks[idx].send(self.qid.to_bytes(2, "big") + wire[2:])
        except OSError:
            tally.send_errors += 1
            return
        pending[idx, self.qid] = time.monotonic()

    def _collect(
        self, wait: float, pending: dict[tuple[int, int], float], tally: Tally, timeout: float
    ) -> None:
        for fd, _ in self.epoll.poll(max(wait, 0.0)):
            now = time.monotonic()
            idx, sock = self.by_fd[fd]
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError as e:  # ECONNREFUSED: nothing listened; ENOBUFS: a watcher lost events
                    tally.recv_errors += idx >= 0
                    if e.errno in (errno.ECONNREFUSED, errno.ENOBUFS):
                        continue
                    break
                if idx < 0:
                    tally.writes += _has_newgen(data)
                    continue
                t = pending.pop((idx, int.from_bytes(data[:2], "big")), None)
                if t is None:
                    tally.stray += 1
                elif now - t > timeout:
                    tally.late += 1
                elif data[3] & 0x0F == 0 and int.from_bytes(data[6:8], "big") > 0:
                    tally.answered += 1
                    tally.latencies.append(now - t)
                else:
                    tally.wrong += 1


def step_row(tally: Tally, rate: float, seconds: float, cpu: dict[str, float]) -> dict[str, Any]:
    """The step's figures: latencies in ms, whether it passed (every query answered, p99 within the goal)."""
    ms = [x * 1000 for x in tally.latencies]
    lags = [x * 1000 for x in tally.lags]
    p99 = percentile(ms, 99)
    return {
        "rate": rate,
        "seconds": seconds,
        "sent": tally.sent,
        "answered": tally.answered,
        "answered_fraction": tally.answered / tally.sent if tally.sent else None,
        "wrong": tally.wrong,
        "late": tally.late,
        "unanswered": tally.sent - tally.answered - tally.wrong,
        "stray": tally.stray,
        "send_errors": tally.send_errors,
        "recv_errors": tally.recv_errors,
        "p50_ms": percentile(ms, 50),
        "p99_ms": p99,
        "max_ms": max(ms) if ms else None,
        "lag_p99_ms": percentile(lags, 99),
        "lag_max_ms": max(lags) if lags else None,
        "writes_per_query": tally.writes / tally.sample_sent if tally.sample_sent else None,
        "cpu_cores": cpu,
        "ok": tally.answered == tally.sent and p99 is not None and p99 <= GOAL_P99_MS,
    }


def noisy(row: dict[str, Any]) -> bool:
    """A failed step during which something else on the machine (not the agent, the upstream or the
    generator) kept more than NOISY_CPUS busy: it says more about the neighbours than about egressd."""
    return not row["ok"] and row["cpu_cores"].get("others", 0.0) > NOISY_CPUS


def counted(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if not row.get("superseded")]


def best_rate(rows: Sequence[dict[str, Any]]) -> float | None:
    """The highest rate of a step that passed (every query answered, p99 within the goal)."""
    return max((row["rate"] for row in counted(rows) if row["ok"]), default=None)


def first_failed(rows: Sequence[dict[str, Any]]) -> float | None:
    return next((row["rate"] for row in counted(rows) if not row["ok"]), None)
