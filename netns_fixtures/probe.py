"""Reachability probes run from inside a namespace, each with a hard time bound.

Socket probes run in-process: the socket is created while the calling thread is switched into the
namespace (see ``_nsutil.in_netns``) and keeps living there. ping, crafted packets and sniffers use
subprocesses under ``ip netns exec``.

Result vocabulary (errno -> result, as measured on Linux 6.18 with nftables; see README.md):

- ``tcp_connect``: ``"open"`` (connected and our line was echoed), ``"reset"`` (ECONNREFUSED,
  ECONNRESET, EPIPE: a TCP RST, including nft ``reject with tcp reset``), ``"unreachable"``
  (EHOSTUNREACH, ENETUNREACH, EACCES, EPERM, EHOSTDOWN: an ICMP error such as nft
  ``reject with icmpx admin-prohibited``, no route, or a local send refused by netfilter),
  ``"timeout"`` (nothing came back: ``drop``), ``"closed"`` (connected, peer closed without echo),
  ``"mismatch"`` (connected, something other than our line came back).
- ``udp_echo``: ``"reply"``, ``"refused"`` (ECONNREFUSED: ICMP port unreachable),
  ``"unreachable"`` (as above; note an output-hook ``drop`` makes send() fail with EPERM, which
  also maps here), ``"timeout"``.
- ``TcpSession.exchange``: ``"ok"`` plus the tcp_connect failure results.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from netns_fixtures._nsutil import PACKAGE_PARENT, CommandError, family_of, netns_socket, run

PROBE_LINE = b"netns-fixtures-probe\n"

_RESET = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE})
_UNREACH = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM, errno.EHOSTDOWN, errno.ENETDOWN}
)


def classify_errno(err: int | None) -> str:
    """Map a socket errno to a probe result; unknown errnos are returned as ``"errno:NAME"``."""
    if err in _RESET:
        return "reset"
    if err in _UNREACH:
        return "unreachable"
    if err in (errno.ETIMEDOUT, errno.EAGAIN):
        return "timeout"
    return f"errno:{errno.errorcode.get(err or 0, err)}"


def _classify(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "timeout"  # socket.timeout from settimeout()
    return classify_errno(exc.errno)


def _recv_line(sock: socket.socket, deadline: float) -> bytes:
    """Read up to and including a newline, or until EOF; raises TimeoutError at the deadline."""
    buf = b""
    while not buf.endswith(b"\n"):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        sock.settimeout(remaining)
        chunk = sock.recv(4096)
        if not chunk:
            break
        buf += chunk
    return buf


class TcpSession:
    """A TCP connection held open across policy changes, to show existing flows get cut (or not)."""

    def __init__(self, sock: socket.socket, ns: str, dst: str, port: int) -> None:
        self.sock = sock
        self.ns, self.dst, self.port = ns, dst, port

    def exchange(self, line: bytes = PROBE_LINE, timeout: float = 1.0) -> str:
        """Send one line and wait for its echo: "ok" | "reset" | "unreachable" | "timeout" | ..."""
        if not line.endswith(b"\n"):
            line += b"\n"
        deadline = time.monotonic() + timeout
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(line)
            got = _recv_line(self.sock, deadline)
        except OSError as exc:
            return _classify(exc)
        if not got:
            return "closed"
        return "ok" if got == line else "mismatch"

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self.sock.close()

    def __enter__(self) -> TcpSession:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class ProbeError(RuntimeError):
    """open_tcp could not establish the connection; ``result`` says why (same words as tcp_connect)."""

    def __init__(self, result: str, what: str) -> None:
        self.result = result
        super().__init__(f"{what}: {result}")


def _connect(ns: str, dst: str, port: int, timeout: float) -> tuple[socket.socket | None, str]:
    sock = netns_socket(ns, family_of(dst), socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect((dst, port))
    except OSError as exc:
        sock.close()
        return None, _classify(exc)
    return sock, "connected"


def open_tcp(ns: str, dst: str, port: int, timeout: float = 1.0) -> TcpSession:
    """Connect from namespace ``ns`` and return the held-open session; raises ProbeError on failure."""
    sock, result = _connect(ns, dst, port, timeout)
    if sock is None:
        raise ProbeError(result, f"tcp connect {ns} -> [{dst}]:{port}")
    return TcpSession(sock, ns, dst, port)


def tcp_connect(ns: str, dst: str, port: int, timeout: float = 1.0) -> str:
    """Connect, send a line, expect it echoed: "open" | "reset" | "unreachable" | "timeout" | ...

    ``timeout`` bounds the connect and, separately, the echo wait (so at most 2 x timeout).
    """
    sock, result = _connect(ns, dst, port, timeout)
    if sock is None:
        return result
    with TcpSession(sock, ns, dst, port) as session:
        result = session.exchange(PROBE_LINE, timeout)
    return "open" if result == "ok" else result


def udp_echo(ns: str, dst: str, port: int, timeout: float = 1.0, payload: bytes = PROBE_LINE) -> str:
    """Send one datagram on a connected socket: "reply" | "refused" | "unreachable" | "timeout"."""
    with netns_socket(ns, family_of(dst), socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
            sock.send(payload)
            data = sock.recv(65535)
        except OSError as exc:
            result = _classify(exc)
            return "refused" if exc.errno == errno.ECONNREFUSED else result
    return "reply" if data == payload else "mismatch"


def ping(ns: str, dst: str, timeout: float = 1.0) -> bool:
    """One ICMP/ICMPv6 echo from ``ns`` using iputils ping; True if a reply arrived in time."""
    argv = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c1", "-W", f"{timeout:g}"]
    if family_of(dst) == socket.AF_INET6:
        argv.append("-6")
    proc = run([*argv, dst], timeout=timeout + 5.0, check=False)
    return proc.returncode == 0


def scapy_send(ns: str, specs: Sequence[dict[str, Any]] | dict[str, Any], timeout: float = 20.0) -> int:
    """Send crafted packets from ``ns`` (see netns_fixtures.craft for the spec); returns count sent.

    Runs ``python -m netns_fixtures.craft`` under ``ip netns exec`` so scapy's view of routes and
    addresses is the namespace's own. Raises CommandError on a bad spec or send error.
    """
    if isinstance(specs, dict):
        specs = [specs]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_PARENT, env.get("PYTHONPATH", "")) if p)
    argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "netns_fixtures.craft"]
    try:
        proc = subprocess.run(
            argv, input=json.dumps(list(specs)), capture_output=True, text=True, timeout=timeout, env=env
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, f"timed out after {timeout}s") from exc
    lines = proc.stdout.strip().splitlines()
    try:
        answer = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        answer = {}
    if proc.returncode != 0 or "sent" not in answer:
        raise CommandError(argv, proc.returncode, str(answer.get("error", "")) + proc.stderr)
    return int(answer["sent"])


def _l3(pkt: Any) -> Any:
    """The outermost IP or IPv6 layer of a scapy packet, or None."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    for layer in (IP, IPv6):
        if pkt.haslayer(layer):
            return pkt.getlayer(layer)
    return None


def l3_proto(pkt: Any) -> int | None:
    """IP protocol (v4) or IPv6 next header of a captured packet."""
    from scapy.layers.inet import IP

    layer = _l3(pkt)
    if layer is None:
        return None
    return int(layer.proto) if isinstance(layer, IP) else int(layer.nh)


class Sniffer:
    """tcpdump inside a namespace for the duration of a ``with`` block; packets parsed with scapy.

    ``iface="any"`` captures on all interfaces (Linux cooked v2 link type; scapy decodes it to the
    IP/IPv6 layer). A packet that passes through a namespace shows up once per interface it crosses.
    """

    def __init__(self, ns: str, iface: str = "any", bpf: str = "", *, ready_timeout: float = 5.0) -> None:
        self.ns, self.iface, self.bpf = ns, iface, bpf
        self.ready_timeout = ready_timeout
        self.packets: list[Any] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmpdir: str | None = None

    @property
    def pcap_path(self) -> str:
        """Where tcpdump writes (exists only while sniffing)."""
        return os.path.join(self._tmpdir or "/nonexistent", "capture.pcap")

    def start(self) -> Sniffer:
        """Start tcpdump and return once it reports it is listening."""
        if self._proc is not None:
            raise RuntimeError("sniffer already started")
        self._tmpdir = tempfile.mkdtemp(prefix=f"sniff-{self.ns}-")
        # -Z root: otherwise tcpdump drops to user "tcpdump", which cannot write our temp dir.
        # --immediate-mode: deliver each packet at once instead of in ring-buffer blocks.
        argv = ["ip", "netns", "exec", self.ns, "tcpdump", "-i", self.iface, "-n", "-U", "--immediate-mode",
                "-Z", "root", "-w", self.pcap_path]  # fmt: skip
        if self.bpf:
            argv.append(self.bpf)
        self._proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            self._wait_listening()
        except BaseException:
            self._kill()
            raise
        return self

    def _wait_listening(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        fd = self._proc.stderr.fileno()
        deadline = time.monotonic() + self.ready_timeout
        buf = b""
        while b"listening on" not in buf:
            remaining = deadline - time.monotonic()
            readable = select.select([fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
            if not readable:
                raise TimeoutError(f"tcpdump in {self.ns} not listening: {buf.decode(errors='replace')}")
            chunk = os.read(fd, 4096)
            if not chunk:
                raise CommandError(["tcpdump"], self._proc.wait(timeout=5), buf.decode(errors="replace"))
            buf += chunk

    def stop(self, settle: float = 0.1) -> list[Any]:
        """Stop tcpdump (after ``settle`` seconds for in-flight packets) and parse the capture."""
        if self._proc is None:
            return self.packets
        time.sleep(settle)
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(timeout=3.0)
        except subprocess.TimeoutExpired:
            self._kill()
        self._close_pipe()
        self._proc = None
        self.packets = self._read()
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        return self.packets

    def _read(self) -> list[Any]:
        from scapy.utils import rdpcap

        # rdpcap only decodes link types whose layer modules are loaded; "-i any" gives Linux
        # cooked v2 (DLT 276), registered by scapy.layers.l2, on top of which IP/IPv6 must be known.
        for module in ("scapy.layers.l2", "scapy.layers.inet", "scapy.layers.inet6"):
            importlib.import_module(module)
        path = self.pcap_path
        if not os.path.exists(path) or os.path.getsize(path) == 0:
            return []
        return list(rdpcap(path))

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5.0)
        self._close_pipe()

    def _close_pipe(self) -> None:
        if self._proc is not None and self._proc.stderr is not None:
            self._proc.stderr.close()

    def __enter__(self) -> Sniffer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.stop()
        else:
            self._kill()
            self._proc = None
            if self._tmpdir is not None:
                shutil.rmtree(self._tmpdir, ignore_errors=True)
                self._tmpdir = None

    # ------------------------------------------------------------------ queries on captured packets
    def ip_packets(self) -> list[Any]:
        """Captured packets that have an IP or IPv6 layer."""
        return [p for p in self.packets if _l3(p) is not None]

    def packets_to(self, dst: str, proto: int | None = None) -> list[Any]:
        """Packets whose outer IP/IPv6 destination is ``dst`` (optionally with protocol number)."""
        want = _canon(dst)
        return [
            p
            for p in self.ip_packets()
            if _canon(_l3(p).dst) == want and (proto is None or l3_proto(p) == proto)
        ]

    def packets_from(self, src: str, proto: int | None = None) -> list[Any]:
        """Packets whose outer IP/IPv6 source is ``src`` (optionally with protocol number)."""
        want = _canon(src)
        return [
            p
            for p in self.ip_packets()
            if _canon(_l3(p).src) == want and (proto is None or l3_proto(p) == proto)
        ]

    def count(self, fn: Callable[[Any], bool]) -> int:
        """Number of captured packets for which ``fn(packet)`` is true."""
        return sum(1 for p in self.packets if fn(p))


def _canon(addr: str) -> str:
    import ipaddress

    return str(ipaddress.ip_address(addr))
