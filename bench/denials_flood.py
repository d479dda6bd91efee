"""bench.denials' flood sender, and the other measuring pieces of bench.denials.

The sender: one process holding a UDP socket in every sandbox namespace, sending denied datagrams to
203.0.113.0/24 (TEST-NET-3, documentation only) at a bounded total rate. `python -m bench.denials_flood
--rate PPS NETNS_PATH...` makes its sockets (each inside its namespace, with egressd's own `in_netns`, which
refuses the host's namespace), prints `ready`, then answers each stdin line `flood SECONDS` with one JSON
line once the flood is over: datagrams sent, how sendto answered (EPERM: the sandbox's table denied it in
the output hook), the flood's wall time and the sender's own CPU time (the kernel's work for each packet, the
table's logging included, is done in its sendto). A separate process, so none of it is the agent's figure.

Sandbox i's k-th datagram goes to 203.0.113.(1 + k % 254), port 1 + k % 65535: every logged packet is a
distinct event (no two alike within the agent's one-second window). Sends are paced on a schedule (total
rate x elapsed), round-robin over the sandboxes; a sender that falls behind catches up without sleeping and
reports the rate it reached.

The bench's side: Flooder drives the sender, add_routes gives each sandbox its way out, StatusPinger times
`status` during the flood, agent_cpu reads the agent's CPU time, wait_watched, settled and delta read its
status.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import select
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.agent import _check_alive
from bench.apply import NETNS_DIR, Deadline, run
from egressd.agent.control import ControlError, request
from egressd.kernel.netns import in_netns
from netns_fixtures._nsutil import close_helper
from tests.integration.agent import AgentProcess

NET = "203.0.113."  # the only destinations this sender ever uses
PAYLOAD = b"egressd-bench-denials"
PACE_S = 0.001  # sleep between batches when on schedule
ROOT = Path(__file__).resolve().parents[1]
STATUS_EVERY_S = 0.05  # status asked this often during the second flood
CLK_TCK = os.sysconf("SC_CLK_TCK")


def make_sockets(paths: Sequence[str]) -> list[socket.socket]:
    def udp() -> socket.socket:
        return socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    return [in_netns(path, udp)[0] for path in paths]


def cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def flood(socks: Sequence[socket.socket], counters: list[int], rate: float, seconds: float) -> dict:
    """Send for `seconds` at `rate` datagrams a second in total; what happened to them."""
    n = len(socks)
    answers: Counter[str] = Counter()
    sent = 0
    u0, s0 = cpu()
    start = time.monotonic()
    end = start + seconds
    while True:
        now = time.monotonic()
        if now >= end:
            break
        due = min(int(rate * (now - start)) + 1, int(rate * seconds))
        while sent < due:
            i = sent % n
            k = counters[i]
            counters[i] = k + 1
            try:
                socks[i].sendto(PAYLOAD, (f"{NET}{1 + k % 254}", 1 + k % 65535))
                answers["ok"] += 1
            except OSError as e:
                answers[errno.errorcode.get(e.errno or 0, str(e.errno))] += 1
            sent += 1
        time.sleep(PACE_S)
    wall = time.monotonic() - start
    u1, s1 = cpu()
    return {
        "sent": sent,
        "eperm": answers.pop("EPERM", 0),
        "ok": answers.pop("ok", 0),
        "other": dict(answers),
        "seconds": wall,
        "utime": u1 - u0,
        "stime": s1 - s0,
    }


# --- the bench's side -----------------------------------------------------------------------------------


def agent_cpu(pid: int) -> float:
    """utime + stime of the whole process (every thread), seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15; fields[0] is field 3


def add_routes(names: Sequence[str], deadline: Deadline) -> None:
    """A way out for each sandbox, so its packets reach the output hook: a veth pair with both ends inside
    (this kernel has no dummy driver), 192.0.2.100/24 on e0, default route via 192.0.2.1. Nobody answers."""
    script = (
        "link set lo up\nlink add e0 type veth peer name e1\nlink set e0 up\nlink set e1 up\n"
        "addr add 192.0.2.100/24 dev e0\nroute add default via 192.0.2.1 dev e0\n"
    )
    for name in names:
        run(["ip", "-n", name, "-batch", "-"], deadline, "routes", stdin=script)


class Flooder:
    """The sender (bench/denials_flood.py): sockets in every sandbox, one flood per request."""

    def __init__(self, names: Sequence[str], rate: float, deadline: Deadline) -> None:
        paths = [str(NETNS_DIR / n) for n in names]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.denials_flood", "--rate", f"{rate:g}", *paths],
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self._line(deadline.timeout("sender start")) != "ready":
            raise RuntimeError("the flood sender did not start")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline().strip() if ready else ""

    def flood(self, seconds: float, deadline: Deadline) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"flood {seconds}\n")
        self.proc.stdin.flush()
        line = self._line(min(seconds + 30, deadline.end - time.monotonic() + 1))
        if not line:
            deadline.check("flood")
            raise RuntimeError("the flood sender did not answer")
        return dict(json.loads(line))

    def close(self) -> None:
        close_helper(self.proc)


class StatusPinger(threading.Thread):
    """`status` (what `egressd status` asks) every STATUS_EVERY_S during the flood, each answer timed."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.path, self.ms, self.errors = path, list[float](), 0
        self._done = threading.Event()

    def run(self) -> None:
        due = time.monotonic()
        while not self._done.is_set():
            t0 = time.perf_counter()
            try:
                request(self.path, {"cmd": "status"}, timeout=10)
                self.ms.append(1000 * (time.perf_counter() - t0))
            except ControlError:
                self.errors += 1
            due += STATUS_EVERY_S
            self._done.wait(max(0.0, due - time.monotonic()))

    def finish(self) -> None:
        self._done.set()
        self.join(15)


def wait_watched(agent: AgentProcess, n: int, deadline: Deadline) -> dict[str, Any]:
    """Until the change monitor watches every sandbox: its socket is the one bound to the log group."""
    while True:
        info = agent.agent_status()
        if (info.get("monitor") or {}).get("watched", 0) >= n:
            return info
        _check_alive(agent, "waiting for the monitor")
        deadline.check("waiting for the monitor")
        time.sleep(0.05)


def settled(agent: AgentProcess, deadline: Deadline) -> dict[str, Any]:
    """The agent's status once no denial window is open any more (at most 5 s more)."""
    end = time.monotonic() + 5
    while True:
        info = agent.agent_status()
        if not (info.get("denials") or {}).get("open") or time.monotonic() > end:
            return info
        deadline.check("after the flood")
        time.sleep(0.1)


def delta(before: dict[str, Any], after: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, int]]:
    """What agent.denials (None: not logging) and the change monitor's counters gained in between."""
    b, a = before.get("monitor") or {}, after.get("monitor") or {}
    monitor = {k: int(a.get(k, 0)) - int(b.get(k, 0)) for k in ("triggers", "overflows")}
    bd, ad = before.get("denials"), after.get("denials")
    if bd is None or ad is None:
        return None, monitor
    drops = {k: v - bd["dropped"].get(k, 0) for k, v in ad["dropped"].items() if v != bd["dropped"].get(k, 0)}
    gained = {k: ad[k] - bd[k] for k in ("events", "packets")}
    return {**gained, "open": ad["open"], "dropped": drops}, monitor


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.denials_flood", description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, required=True, help="datagrams a second, all sandboxes together")
    p.add_argument("paths", nargs="+", help="network namespace paths (/run/netns/NAME)")
    args = p.parse_args(argv)
    socks = make_sockets(args.paths)
    counters = [0] * len(socks)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, _, value = line.strip().partition(" ")
        if cmd != "flood":
            break
        print(json.dumps(flood(socks, counters, args.rate, float(value))), flush=True)
    for s in socks:
        s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
