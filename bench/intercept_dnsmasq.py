"""bench.intercept's third way: dnsmasq with `--nftset`, doing in one sandbox the job egressd's proxy does.

dnsmasq (package dnsmasq-base) runs inside the sandbox's namespace (`ip netns exec`), in its own process
group, from a throwaway config: it listens on 127.0.0.1:53 only, forwards every query to the one upstream
(`--no-resolv --server`, no cache, no hosts file) and adds each A/AAAA address of an answer for the bench's
two names to a set of its own table, `inet dnsmasqbench`, made here beforehand like egressd's learned sets
(`learned4`/`learned6`, ipv4_addr/ipv6_addr, flags timeout). dnsmasq's nftset adds an element with no
timeout of its own, so the sets get a default one, the answers' TTL, where egressd gives each element the
TTL of its answer. Nothing else is configured: no DHCP, no other interface, no other server.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.apply import Deadline, run

DNSMASQ = "/usr/sbin/dnsmasq"
TABLE = "dnsmasqbench"  # not `egressd`: egressd's table in the same namespace is left alone
SETS = {4: "learned4", 6: "learned6"}
LISTEN = "127.0.0.1"
STOP_WAIT_S = 5.0
READY_S = 10.0


def nftset_support() -> tuple[bool, str]:
    """Whether this dnsmasq was built with nftset (`dnsmasq --version` lists `nftset`, not `no-nftset`,
    among its compile-time options), and its version line."""
    try:
        proc = subprocess.run([DNSMASQ, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, f"{DNSMASQ}: {e}"
    lines = proc.stdout.splitlines()
    options = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("Compile time options")), [])
    return "nftset" in options, lines[0] if lines else proc.stderr.strip()


def set_addresses(listing: dict[str, Any]) -> list[str]:
    """The addresses in an `nft -j list set` answer (elements with a timeout are {"elem": {"val": ...}})."""
    out: list[str] = []
    for obj in listing.get("nftables", []):
        for elem in obj.get("set", {}).get("elem", []):
            value = elem["elem"]["val"] if isinstance(elem, dict) and "elem" in elem else elem
            if isinstance(value, str):
                out.append(value)
    return out


class Dnsmasq:
    """One dnsmasq in namespace `ns`, its config, log and stderr in `workdir`. `stop()` in every path."""

    def __init__(self, ns: str, workdir: Path, upstream: str, names: Sequence[str], ttl: int) -> None:
        self.ns = ns
        self.ttl = ttl
        self.dir = workdir
        self.conf = workdir / "dnsmasq.conf"
        self.log = workdir / "dnsmasq.log"
        self.stderr = workdir / "dnsmasq.stderr"
        self.proc: subprocess.Popen[bytes] | None = None
        self.returncode: int | None = None
        domains = "".join(f"/{n}" for n in names)
        sets = ",".join(f"{v}#inet#{TABLE}#{s}" for v, s in SETS.items())
        self.config = "\n".join(
            (
                "# bench.intercept: the sandbox's resolver, filling nftables sets; thrown away after the run",
                "port=53",
                f"listen-address={LISTEN}",
                "bind-interfaces",
                "no-resolv",
                f"server={upstream}",
                "no-hosts",
                "cache-size=0",  # every query forwarded, as egressd's proxy (which keeps no cache) does
                f"nftset={domains}/{sets}",
                f"log-facility={self.log}",
                f"pid-file={workdir / 'dnsmasq.pid'}",
                "",
            )
        )
        self.argv = ["ip", "netns", "exec", ns, DNSMASQ, "--keep-in-foreground", f"--conf-file={self.conf}"]

    def create_sets(self, deadline: Deadline) -> None:
        """The table and its two sets, in the sandbox's namespace, before dnsmasq starts."""
        sets = "".join(
            f"  set {name} {{ type ipv{v}_addr; flags timeout; timeout {self.ttl}s; }}\n"
            for v, name in SETS.items()
        )
        script = f"table inet {TABLE} {{\n{sets}}}\n"
        run(
            ["ip", "netns", "exec", self.ns, "nft", "-f", "-"],
            deadline,
            "making dnsmasq's sets",
            stdin=script,
        )

    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config)
        with self.stderr.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=err,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, signalled as one in stop()
            )

    def check_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            code = None if self.proc is None else self.proc.returncode
            raise RuntimeError(f"dnsmasq in {self.ns} is not running (exit {code}): {self.output_tail()}")

    def wait_answering(self, ask: Callable[[], dict[str, Any]], deadline: Deadline) -> float:
        """Asks (`ask()`: one query through it) until an answer comes back; returns the seconds it took."""
        t0 = time.monotonic()
        while True:
            self.check_running()
            if ask().get("rcode") == 0:
                return time.monotonic() - t0
            deadline.check("waiting for dnsmasq")
            if time.monotonic() - t0 > READY_S:
                raise RuntimeError(f"dnsmasq in {self.ns} did not answer in {READY_S:g} s")
            time.sleep(0.05)

    def listed(self, deadline: Deadline) -> dict[str, list[str]]:
        """The addresses in each of its sets now, as the kernel lists them."""
        out = {}
        for name in SETS.values():
            argv = ["ip", "netns", "exec", self.ns, "nft", "-j", "list", "set", "inet", TABLE, name]
            out[name] = set_addresses(json.loads(run(argv, deadline, f"listing {name}").stdout))
        return out

    def log_errors(self) -> list[str]:
        """The lines of its log where adding to a set failed (`nftset inet TABLE SET Error: ...`)."""
        with contextlib.suppress(OSError):
            return [ln for ln in self.log.read_text(errors="replace").splitlines() if "nftset inet" in ln]
        return []

    def output_tail(self) -> str:
        text = ""
        for path in (self.stderr, self.log):
            with contextlib.suppress(OSError):
                text += path.read_text(errors="replace")
        return text[-2000:]

    def stop(self) -> None:
        """SIGTERM to its process group, SIGKILL after STOP_WAIT_S; safe to call more than once."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(STOP_WAIT_S)
        self.returncode = proc.returncode
