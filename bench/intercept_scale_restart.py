"""The DNS gap of bench.intercept_scale: how long a sandbox's queries go unanswered while the agent restarts,
and whether what it learned stays in force meanwhile.

A client in one intercepted sandbox asks a name every 10 ms and gives each query 50 ms; it runs as a process
of its own inside the sandbox (`python -m bench.intercept_scale_restart NS SERVER NAME`), so nothing the
bench does while it restarts the agent (reading the log, asking status) delays it. Both time with
CLOCK_MONOTONIC, which is one clock for every process of the machine. While the agent is down the sandbox's
learned set is read from the kernel and a TCP connection is made to every address of the name's pool.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import select
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import dns.message

from bench.agent import LogTail, rotate_log, wait_started
from bench.apply import Deadline
from bench.intercept_scale_upstream import readline_within
from egressd.kernel.nft import LibnftBackend
from netns_fixtures import tcp_connect
from netns_fixtures._nsutil import PACKAGE_PARENT, netns_path, set_parent_death_signal
from tests.integration.agent import AgentProcess

INTERVAL_S = 0.01
TIMEOUT_S = 0.05
WARM_S = 1.0  # the client runs this long before the restart (the sandbox learns the pool)
AFTER_S = 1.0  # and this long after every sandbox is enforced again
START_TIMEOUT_S = 10.0


def probe(server: str, name: str) -> None:
    """The client (run inside the sandbox): one query every INTERVAL_S until stdin closes, then prints when
    each was sent and when each answered one (NOERROR with records, within TIMEOUT_S) came back."""
    wire = dns.message.make_query(name, "A").to_wire()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK)
    sock.connect((server, 53))
    sent: list[float] = []
    answered: list[tuple[int, float]] = []
    pending: dict[int, int] = {}
    print("ready", flush=True)
    start = time.monotonic()
    while not select.select([sys.stdin], [], [], 0)[0]:
        now = time.monotonic()
        if start + len(sent) * INTERVAL_S <= now:
            k = len(sent)
            pending[k & 0xFFFF] = k
            sent.append(now)
            with contextlib.suppress(OSError):  # an earlier query's ICMP error (nothing listened): lost too
                sock.send((k & 0xFFFF).to_bytes(2, "big") + wire[2:])
        wait = start + len(sent) * INTERVAL_S - time.monotonic()
        if select.select([sock], [], [], max(0.0, wait))[0]:
            while True:
                try:
                    data = sock.recv(65535)
                except BlockingIOError:
                    break
                except OSError:
                    continue  # ECONNREFUSED: nothing listened for an earlier query
                now = time.monotonic()
                idx = pending.pop(int.from_bytes(data[:2], "big"), None)
                ok = data[3] & 0x0F == 0 and int.from_bytes(data[6:8], "big") > 0
                if idx is not None and ok and now - sent[idx] <= TIMEOUT_S:
                    answered.append((idx, now))
    print(json.dumps({"sent": sent, "answered": answered}), flush=True)


class Prober:
    """The client's process, from the bench's side."""

    def __init__(self, ns: str, server: str, name: str) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "bench.intercept_scale_restart", server, name],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=PACKAGE_PARENT,
            preexec_fn=set_parent_death_signal,
        )
        if self._line(START_TIMEOUT_S) != "ready":
            self.close()
            raise RuntimeError(f"the restart client in {ns} did not start")

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        return readline_within(self.proc.stdout, timeout)

    def finish(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        line = self._line(START_TIMEOUT_S)
        self.close()
        if not line:
            raise RuntimeError("the restart client gave no result")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


def gap_figures(data: Mapping[str, Any], t0: float, end: float) -> dict[str, Any]:
    """Over the queries sent from t0 (SIGTERM) to `end` less one timeout: how many went unanswered, the
    longest stretch between two answers, when (seconds after t0) the first and last unanswered were sent."""
    sent: Sequence[float] = data["sent"]
    got = {k: t for k, t in data["answered"]}
    window = [k for k, t in enumerate(sent) if t0 <= t <= end - TIMEOUT_S]
    missed = [k for k in window if k not in got]
    replies = sorted(t for k, t in got.items() if t0 <= sent[k] <= end)
    marks = [t0, *replies]
    longest = max((b - a for a, b in itertools.pairwise(marks)), default=None)
    return {
        "queries": len(window),
        "unanswered": len(missed),
        "longest_without_answer_s": longest,
        "first_unanswered_s": sent[missed[0]] - t0 if missed else None,
        "last_unanswered_s": sent[missed[-1]] - t0 if missed else None,
        "answered_before_sigterm": sum(1 for k in got if sent[k] < t0),
    }


def in_force(ns: str, pool: Sequence[str], denied: str) -> dict[str, Any]:
    """What the kernel enforces for the sandbox right now: its learned set, and TCP to the pool and to an
    address it was never given (the inet namespace answers TCP on port 80 at every documentation address)."""
    backend = LibnftBackend()
    try:
        learned = backend.read_learned(netns_path(ns))
    finally:
        backend.close()
    return {
        "learned": sorted(learned),
        "tcp": {addr: tcp_connect(ns, addr, 80, timeout=0.5) for addr in pool},
        "tcp_never_given": {denied: tcp_connect(ns, denied, 80, timeout=0.5)},
    }


def log_times(agent: AgentProcess, t0_wall: float) -> dict[str, Any]:
    """From the new agent's log: when (seconds after SIGTERM) its proxies listened again, first and last."""

    def at(event: Mapping[str, Any]) -> float:
        return datetime.fromisoformat(str(event["ts"]).replace("Z", "+00:00")).timestamp() - t0_wall

    opened = [at(e) for e in agent.events("dns_intercepting")]
    return {
        "proxies_opened": len(opened),
        "first_proxy_s": min(opened, default=None),
        "last_proxy_s": max(opened, default=None),
    }


def restart_gap(
    agent: AgentProcess, expected: Mapping[str, int], ns: str, names: tuple[str, str, Sequence[str], str],
    deadline: Deadline,
) -> dict[str, Any]:  # fmt: skip
    """SIGTERM the agent, start it again, wait until READY and every sandbox enforced, with the client
    asking all along. `names`: (the server the client asks, the name, the name's pool, an address never
    given). Times in seconds after SIGTERM."""
    server, name, pool, denied = names
    prober = Prober(ns, server, name)
    try:
        time.sleep(WARM_S)
        before = in_force(ns, pool, denied)
        tail: LogTail = rotate_log(agent)
        t0, t0_wall = time.monotonic(), time.time()
        code = agent.stop()
        exited = time.monotonic()
        agent.start(wait_ready=False)
        spawned = time.monotonic()
        during = in_force(ns, pool, denied)
        checked = time.monotonic()
        ready, done, _ = wait_started(agent, tail, expected, deadline, "the restart")
        time.sleep(AFTER_S)
        data = prober.finish()
        end = time.monotonic()
    finally:
        prober.close()
    return {
        "sandboxes": len(expected),
        "exit_status": code,
        "times_s": {
            "exited": exited - t0,
            "spawned": spawned - t0,
            "checked_while_down": checked - t0,
            "ready": ready - t0,
            "all_enforced": done - t0,
        },
        "log": log_times(agent, t0_wall),
        "gap": gap_figures(data, t0, end),
        "learned_before": before,
        "learned_while_down": during,
        "learned_kept": bool(before["learned"]) and set(before["learned"]) <= set(during["learned"]),
        "checked_before_ready": checked < ready,
        "tcp_open_while_down": all(during["tcp"][a] == "open" for a in pool if a in before["learned"]),
        "never_given_closed_while_down": during["tcp_never_given"][denied] != "open",
    }


if __name__ == "__main__":
    probe(sys.argv[1], sys.argv[2])
