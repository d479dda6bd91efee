"""Throwaway network-namespace worlds: an "internet", a router, sandboxes and optional microVMs.

The world is built only from fresh namespaces named ``{prefix}...``; no veth end ever lives in the
caller's namespace and nothing in it is changed, so a world can be created and destroyed on a
developer machine or in CI without touching real networking. See README.md for the address plan.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from types import TracebackType

from netns_fixtures._nsutil import (
    PACKAGE_PARENT,
    CommandError,
    delete_namespaces,
    ip_batch,
    list_namespaces,
    netns_path,
    nsexec,
    run,
    validate_prefix,
)

MAX_SANDBOXES = 200
INET_TCP_PORTS = (80, 443, 5001)
INET_UDP_PORTS = (5353, 7)
SANDBOX_TCP_PORT = 8080
# Documentation ranges made entirely local in the inet namespace (AnyIP).
INET_LOCAL_V4 = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
INET_LOCAL_V6 = ("2001:db8::/32",)
ROUTER_INET4, INET4 = "10.255.0.1", "10.255.0.2"
ROUTER_INET6, INET6 = "fd00:255::1", "fd00:255::2"
ROUTER_INET_IF = "inet0"
SERVER_READY_TIMEOUT = 10.0
SETTLE_TIMEOUT = 5.0


@dataclass(frozen=True)
class VmNS:
    """A namespace standing in for a microVM behind a sandbox's tap device."""

    name: str
    netns_path: str
    addr4: str
    addr6: str
    gw4: str
    gw6: str


@dataclass(frozen=True)
class SandboxNS:
    """One sandbox namespace: ``eth0`` towards the router, optional ``tap0`` towards its VM."""

    index: int
    name: str
    netns_path: str
    addr4: str
    addr6: str
    gw4: str
    gw6: str
    host_if: str
    vm: VmNS | None = None
    vm_if: str | None = None


@dataclass
class _Plan:
    """Everything derived from (prefix, sandboxes, vm) before any namespace exists."""

    inet: str
    router: str
    sandboxes: list[SandboxNS] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        out = [self.inet, self.router]
        for sb in self.sandboxes:
            out.append(sb.name)
            if sb.vm is not None:
                out.append(sb.vm.name)
        return out


def _v6(text: str) -> str:
    """Canonical (compressed) form, so "fd00:200:0::2" compares equal to what scapy/ip print."""
    return str(ipaddress.IPv6Address(text))


def _plan(prefix: str, sandboxes: int, vm: bool) -> _Plan:
    short = prefix[:8]
    plan = _Plan(inet=f"{prefix}inet", router=f"{prefix}router")
    for i in range(sandboxes):
        # The v6 group spells the decimal index literally: sandbox 12 -> 10.200.12.2 / fd00:200:12::2.
        vm_ns = None
        if vm:
            vm_name = f"{prefix}vm{i}"
            vm_ns = VmNS(
                name=vm_name,
                netns_path=netns_path(vm_name),
                addr4=f"10.210.{i}.2",
                addr6=_v6(f"fd00:210:{i}::2"),
                gw4=f"10.210.{i}.1",
                gw6=_v6(f"fd00:210:{i}::1"),
            )
        name = f"{prefix}sb{i}"
        plan.sandboxes.append(
            SandboxNS(
                index=i,
                name=name,
                netns_path=netns_path(name),
                addr4=f"10.200.{i}.2",
                addr6=_v6(f"fd00:200:{i}::2"),
                gw4=f"10.200.{i}.1",
                gw6=_v6(f"fd00:200:{i}::1"),
                host_if=f"{short}h{i}",
                vm=vm_ns,
                vm_if="tap0" if vm else None,
            )
        )
    return plan


class _IfIndex:
    """Hands out distinct ifindexes for veth ends.

    Why: when both ends of a veth pair get the same ifindex (each namespace counts from 2), the
    kernel treats the carrier change as non-urgent and delays it by up to 1 s (linkwatch), so IPv6
    addresses stay tentative and the first packets are lost. Distinct indexes make it immediate.
    """

    def __init__(self) -> None:
        self._next = 100

    def __call__(self) -> int:
        self._next += 1
        return self._next


class World:
    """Context manager that builds the namespaces on enter and removes everything on exit."""

    def __init__(self, prefix: str, sandboxes: int = 2, vm: bool = False) -> None:
        validate_prefix(prefix)
        if not 0 <= sandboxes <= MAX_SANDBOXES:
            raise ValueError(f"sandboxes must be 0..{MAX_SANDBOXES}")
        self.prefix = prefix
        self.vm = vm
        plan = _plan(prefix, sandboxes, vm)
        self._plan = plan
        self.inet: str = plan.inet
        self.router: str = plan.router
        self.sandboxes: list[SandboxNS] = plan.sandboxes
        self.router_inet_if = ROUTER_INET_IF
        self.inet_addr4, self.inet_addr6 = INET4, INET6
        self.router_addr4, self.router_addr6 = ROUTER_INET4, ROUTER_INET6
        self.build_seconds: float | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._tmpdir: str | None = None
        self._started = False
        self._closed = False

    # ----------------------------------------------------------------------------- lifecycle
    @property
    def namespaces(self) -> list[str]:
        """Every namespace name of this world (inet, router, sandboxes, vms)."""
        return self._plan.names

    def __enter__(self) -> World:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def start(self) -> World:
        """Build namespaces, links, addresses, routes and servers; on any failure clean up and raise."""
        if self._started:
            return self
        if self._closed:
            raise RuntimeError("world already closed")
        existing = [n for n in self.namespaces if os.path.exists(netns_path(n))]
        if existing:
            raise FileExistsError(
                f"namespaces already exist: {existing}; call netns_fixtures.cleanup({self.prefix!r})"
            )
        self._started = True
        t0 = time.monotonic()
        try:
            self._tmpdir = tempfile.mkdtemp(prefix=f"netns-{self.prefix}-")
            self._build()
            self._start_servers()
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - t0
        return self

    def close(self) -> None:
        """Stop every process started for the world and delete every namespace (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if not self._started:
            return  # never built: the names may belong to someone else's world
        for proc in self._procs:
            _stop_process(proc)
        self._procs.clear()
        # Also catches processes someone else started in our namespaces (sniffers, shells).
        delete_namespaces(self.namespaces)
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ----------------------------------------------------------------------------- helpers
    def sandbox(self, index: int) -> SandboxNS:
        """Sandbox by index (same as ``world.sandboxes[index]``)."""
        return self.sandboxes[index]

    def exec(
        self, ns: str, argv: list[str], *, input: str | None = None, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in one of this world's namespaces (e.g. ``["nft", "-f", "-"]``)."""
        if ns not in self.namespaces:
            raise ValueError(f"{ns!r} is not a namespace of this world")
        return nsexec(ns, argv, input=input, timeout=timeout, check=check)

    # ----------------------------------------------------------------------------- build
    def _build(self) -> None:
        ip_batch([f"netns add {n}" for n in self.namespaces])
        self._sysctls()
        ifx = _IfIndex()
        inet, router = self.inet, self.router

        router_cmds = [
            "link set lo up",
            f"link add {ROUTER_INET_IF} index {ifx()} type veth peer name eth0 index {ifx()} netns {inet}",
            f"link set {ROUTER_INET_IF} up",
            f"addr add {ROUTER_INET4}/30 dev {ROUTER_INET_IF}",
            f"addr add {ROUTER_INET6}/64 dev {ROUTER_INET_IF} nodad",
            f"route add 0.0.0.0/0 via {INET4}",
            f"route add ::/0 via {INET6}",
        ]
        for sb in self.sandboxes:
            router_cmds += [
                f"link add {sb.host_if} index {ifx()} type veth peer name eth0 index {ifx()} netns {sb.name}",
                f"link set {sb.host_if} up",
                f"addr add {sb.gw4}/24 dev {sb.host_if}",
                f"addr add {sb.gw6}/64 dev {sb.host_if} nodad",
            ]
            if sb.vm is not None:
                router_cmds += [
                    f"route add 10.210.{sb.index}.0/24 via {sb.addr4}",
                    f"route add fd00:210:{sb.index}::/64 via {sb.addr6}",
                ]
        # Create every link first (router side), so the per-namespace batches below find their eth0.
        ip_batch(router_cmds, router)

        inet_cmds = [
            "link set lo up",
            "link set eth0 up",
            f"addr add {INET4}/30 dev eth0",
            f"addr add {INET6}/64 dev eth0 nodad",
            *(f"route add local {net} dev lo" for net in (*INET_LOCAL_V4, *INET_LOCAL_V6)),
            f"route add 10.200.0.0/16 via {ROUTER_INET4}",
            f"route add 10.210.0.0/16 via {ROUTER_INET4}",
            f"route add fd00:200::/32 via {ROUTER_INET6}",
            f"route add fd00:210::/32 via {ROUTER_INET6}",
        ]
        batches: list[tuple[str, list[str]]] = [(inet, inet_cmds)]
        vm_batches: list[tuple[str, list[str]]] = []
        for sb in self.sandboxes:
            cmds = [
                "link set lo up",
                "link set eth0 up",
                f"addr add {sb.addr4}/24 dev eth0",
                f"addr add {sb.addr6}/64 dev eth0 nodad",
                f"route add 0.0.0.0/0 via {sb.gw4}",
                f"route add ::/0 via {sb.gw6}",
            ]
            if sb.vm is not None:
                cmds += [
                    f"link add tap0 index {ifx()} type veth peer name eth0 index {ifx()} netns {sb.vm.name}",
                    "link set tap0 up",
                    f"addr add {sb.vm.gw4}/24 dev tap0",
                    f"addr add {sb.vm.gw6}/64 dev tap0 nodad",
                ]
                vm_batches.append(
                    (
                        sb.vm.name,
                        [
                            "link set lo up",
                            "link set eth0 up",
                            f"addr add {sb.vm.addr4}/24 dev eth0",
                            f"addr add {sb.vm.addr6}/64 dev eth0 nodad",
                            f"route add 0.0.0.0/0 via {sb.vm.gw4}",
                            f"route add ::/0 via {sb.vm.gw6}",
                        ],
                    )
                )
            batches.append((sb.name, cmds))
        _parallel_batches(batches)
        _parallel_batches(vm_batches)
        self._wait_settled()

    def _sysctls(self) -> None:
        """Per-namespace sysctls, set before any address exists (accept_dad is read at add time)."""
        base = [
            "net.ipv6.conf.all.accept_dad=0",
            "net.ipv6.conf.default.accept_dad=0",
            "net.ipv6.conf.all.accept_ra=0",
            "net.ipv6.conf.default.accept_ra=0",
            "net.ipv6.conf.default.router_solicitations=0",
            # No per-destination ICMP rate limit: back-to-back probes against a `reject` rule
            # would otherwise see some ICMP errors suppressed (v4: 1/s after a burst of 6).
            "net.ipv4.icmp_ratelimit=0",
            "net.ipv6.icmp.ratelimit=0",
        ]
        fwd = ["net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"]
        jobs: list[tuple[str, list[str]]] = [(self.inet, base), (self.router, base + fwd)]
        for sb in self.sandboxes:
            jobs.append((sb.name, base + fwd if sb.vm is not None else base))
            if sb.vm is not None:
                jobs.append((sb.vm.name, base))
        procs = [
            (
                ns,
                subprocess.Popen(
                    ["ip", "netns", "exec", ns, "sysctl", "-q", "-w", *settings],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.PIPE,
                ),
            )
            for ns, settings in jobs
        ]
        _wait_all(procs, "sysctl")

    def _wait_settled(self) -> None:
        """Wait until no IPv6 address is tentative anywhere, so the first packet is never lost."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        pending = list(self.namespaces)
        while pending:
            pending = [
                ns
                for ns in pending
                if run(["ip", "-n", ns, "-6", "addr", "show", "tentative"], timeout=5.0).stdout.strip()
            ]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"IPv6 addresses still tentative in {pending}")
            time.sleep(0.02)

    # ----------------------------------------------------------------------------- servers
    def _spawn_server(self, ns: str, tcp: tuple[int, ...], udp: tuple[int, ...]) -> subprocess.Popen[bytes]:
        assert self._tmpdir is not None
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        argv = [
            "ip", "netns", "exec", ns, sys.executable, "-m", "netns_fixtures.server",
            "--tcp", ",".join(map(str, tcp)), "--udp", ",".join(map(str, udp)),
        ]  # fmt: skip
        with open(os.path.join(self._tmpdir, f"server-{ns}.log"), "wb") as log:
            proc = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, env=env, cwd="/"
            )
        self._procs.append(proc)
        return proc

    def _start_servers(self) -> None:
        procs = [self._spawn_server(self.inet, INET_TCP_PORTS, INET_UDP_PORTS)]
        for sb in self.sandboxes:
            procs.append(self._spawn_server(sb.name, (SANDBOX_TCP_PORT,), ()))
            if sb.vm is not None:
                procs.append(self._spawn_server(sb.vm.name, (SANDBOX_TCP_PORT,), ()))
        deadline = time.monotonic() + SERVER_READY_TIMEOUT
        for proc in procs:
            if not _wait_ready(proc, deadline):
                log = self._server_log(proc)
                raise TimeoutError(f"echo server {proc.args!r} not ready: {log}")

    def _server_log(self, proc: subprocess.Popen[bytes]) -> str:
        ns = str(proc.args[3]) if isinstance(proc.args, list) else "?"
        path = os.path.join(self._tmpdir or "/nonexistent", f"server-{ns}.log")
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-2000:]
        except OSError:
            return "<no log>"


def _parallel_batches(batches: list[tuple[str, list[str]]]) -> None:
    """Run one `ip -n NS -batch -` per namespace concurrently."""
    procs = []
    for ns, lines in batches:
        proc = subprocess.Popen(
            ["ip", "-n", ns, "-batch", "-"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None
        proc.stdin.write(("\n".join(lines) + "\n").encode())
        proc.stdin.close()
        procs.append((ns, proc))
    _wait_all(procs, "ip -batch")


def _wait_all(procs: list[tuple[str, subprocess.Popen[bytes]]], what: str, timeout: float = 15.0) -> None:
    """Wait for helper processes with one shared deadline; raise with the first failure's stderr."""
    deadline = time.monotonic() + timeout
    errors = []
    for ns, proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        if proc.returncode != 0:
            errors.append(f"{ns}: rc={proc.returncode} {stderr.strip()}")
    if errors:
        raise CommandError([what], None, "; ".join(errors))


def _wait_ready(proc: subprocess.Popen[bytes], deadline: float) -> bool:
    """Read the server's stdout until it says READY, the process dies, or the deadline passes."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = b""
    while b"READY\n" not in buf:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        readable, _, _ = select.select([fd], [], [], remaining)
        if not readable:
            return False
        chunk = os.read(fd, 4096)
        if not chunk:
            return False
        buf += chunk
    return True


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Close stdin (the server exits on EOF), then SIGTERM, then SIGKILL; always reap."""
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5.0)
    if proc.stdout is not None:
        proc.stdout.close()


def cleanup(prefix: str) -> list[str]:
    """Remove every namespace whose name starts with ``prefix`` (leftovers of crashed runs).

    Processes inside them are killed first. Returns the names that were removed.
    """
    validate_prefix(prefix)
    names = list_namespaces(prefix)
    delete_namespaces(names)
    return names
