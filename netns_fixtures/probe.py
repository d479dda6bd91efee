"""Reachability probes run from inside a namespace, each with a hard time bound.

Socket probes run in-process: the socket is created while the calling thread is switched into the
namespace (see ``_nsutil.in_netns``) and keeps living there. ping, crafted packets and sniffers use
subprocesses under ``ip netns exec``.

Result vocabulary (measured on Linux 6.18 with nftables; full table in README.md):

- ``tcp_connect``: ``"open"`` (connected and our line was echoed); ``"reset"`` (ECONNREFUSED,
  ECONNRESET, EPIPE: a RST, e.g. nft ``reject with tcp reset``, or ICMP port-unreachable, e.g. plain
  ``reject``); ``"unreachable"`` (EHOSTUNREACH, ENETUNREACH, EACCES, EPERM, EHOSTDOWN, ENETDOWN:
  an ICMP error such as ``reject with icmpx admin-prohibited`` - EHOSTUNREACH on v4, EACCES on v6 -
  or no route); ``"timeout"`` (nothing came back: ``drop``); ``"closed"`` / ``"mismatch"``
  (connected, but the peer closed / answered something else).
- ``udp_echo``: ``"reply"``; ``"refused"`` (ECONNREFUSED: ICMP port-unreachable); ``"unreachable"``
  (as above - note any output-hook ``drop`` or ``reject`` in the *sender's own* namespace makes
  send() fail with EPERM, so drop and reject look the same there); ``"timeout"``.
- ``TcpSession.exchange``: ``"ok"`` plus the failure words above. An ICMP error on an established
  connection is a soft error for TCP, so ``reject with icmpx ...`` shows as ``"timeout"`` there.
- ``*_probe`` variants return an ``Outcome`` with the errno name, stage and elapsed time.
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
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from netns_fixtures._nsutil import (
    PACKAGE_PARENT,
    CommandError,
    family_of,
    netns_socket,
    run,
    set_parent_death_signal,
)

PROBE_LINE = b"netns-fixtures-probe\n"
IP_RECVERR = 11  # linux/in.h (not exported by Python's socket module)
IPV6_RECVERR = 25  # linux/in6.h

_RESET = frozenset({errno.ECONNREFUSED, errno.ECONNRESET, errno.EPIPE})
_UNREACH = frozenset(
    {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES, errno.EPERM, errno.EHOSTDOWN, errno.ENETDOWN}
)


@dataclass(frozen=True)
class Outcome:
    """A probe result plus how it came about (for assertions that care, and for failure messages).

    ``stage`` is where it was decided: "connect", "icmp" (an ICMP error seen on the socket's error
    queue during connect), "send", "recv" or "" for success.
    """

    result: str
    errno: str | None = None
    stage: str = ""
    seconds: float = 0.0

    def __str__(self) -> str:
        detail = f" {self.errno} at {self.stage}" if self.errno else ""
        return f"{self.result}{detail} after {self.seconds:.3f}s"


def classify_errno(err: int | None) -> str:
    """Map a socket errno to a probe result; unknown errnos are returned as ``"errno:NAME"``."""
    if err in _RESET:
        return "reset"
    if err in _UNREACH:
        return "unreachable"
    if err in (errno.ETIMEDOUT, errno.EAGAIN):
        return "timeout"
    return f"errno:{errno.errorcode.get(err or 0, err)}"


def _errname(err: int | None) -> str | None:
    return None if err is None else errno.errorcode.get(err, str(err))


class _Failed(Exception):
    """Internal: a probe step failed with an errno (None = timed out) at a stage."""

    def __init__(self, err: int | None, stage: str) -> None:
        super().__init__(stage)
        self.err, self.stage = err, stage

    @classmethod
    def from_os(cls, exc: OSError, stage: str) -> _Failed:
        if isinstance(exc, TimeoutError) and exc.errno is None:
            return cls(None, stage)  # socket.timeout from settimeout()
        return cls(exc.errno, stage)

    def outcome(self, t0: float, refused_word: str = "reset") -> Outcome:
        if self.err is None:
            result = "timeout"
        elif self.err == errno.ECONNREFUSED:
            result = refused_word
        else:
            result = classify_errno(self.err)
        return Outcome(result, _errname(self.err), self.stage, time.monotonic() - t0)


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
    """A TCP connection held open across policy changes, to show existing flows get cut (or not).

    The socket behaves like an ordinary application's (no IP_RECVERR), so an ICMP error on an
    established connection is a soft error: ``exchange`` then reports "timeout", not "unreachable".
    """

    def __init__(self, sock: socket.socket, ns: str, dst: str, port: int) -> None:
        self.sock = sock
        self.ns, self.dst, self.port = ns, dst, port

    def exchange_ex(self, line: bytes = PROBE_LINE, timeout: float = 1.0) -> Outcome:
        """Like ``exchange`` but with errno, stage and elapsed time."""
        if not line.endswith(b"\n"):
            line += b"\n"
        t0 = time.monotonic()
        stage = "send"
        try:
            self.sock.settimeout(timeout)
            self.sock.sendall(line)
            stage = "recv"
            got = _recv_line(self.sock, t0 + timeout)
        except OSError as exc:
            return _Failed.from_os(exc, stage).outcome(t0)
        result = "closed" if not got else "ok" if got == line else "mismatch"
        return Outcome(result, None, "" if result == "ok" else "recv", time.monotonic() - t0)

    def exchange(self, line: bytes = PROBE_LINE, timeout: float = 1.0) -> str:
        """Send one line and wait for its echo: "ok" | "reset" | "unreachable" | "timeout" | "closed"."""
        return self.exchange_ex(line, timeout).result

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
    """open_tcp could not connect; ``result``/``outcome`` say why (same words as tcp_connect)."""

    def __init__(self, outcome: Outcome, what: str) -> None:
        self.outcome = outcome
        self.result = outcome.result
        super().__init__(f"{what}: {outcome}")


def _set_recverr(sock: socket.socket, on: bool) -> None:
    """IP_RECVERR/IPV6_RECVERR: queue every ICMP error on the socket's error queue (and make UDP
    report soft ICMP errors such as host-unreachable, which it otherwise ignores)."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, int(on))
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, int(on))


def _pop_icmp_errno(sock: socket.socket) -> int | None:
    """errno of the first queued ICMP error (struct sock_extended_err.ee_errno), if any."""
    try:
        _data, ancdata, _flags, _addr = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return None
    for level, ctype, cdata in ancdata:
        ours = (level, ctype) in ((socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR))
        if ours and len(cdata) >= 4:
            return int(struct.unpack_from("=I", cdata)[0])
    return None


def _connect(ns: str, dst: str, port: int, timeout: float) -> socket.socket:
    """Non-blocking connect that also watches the socket's error queue; raises _Failed.

    Why: on this kernel the ICMP(v6) error for the *first* SYN is often processed while connect()
    still owns the socket (it all happens synchronously across veths/loopback); TCP then records
    only a soft error (TcpExtLockDroppedIcmps) and connect() fails on the retransmitted SYN ~1 s
    later (measured: always for IPv6). With IP(V6)_RECVERR the error is also queued, POLLERR fires
    at once, and we report what actually came back instead of "timeout".
    """
    sock = netns_socket(ns, family_of(dst), socket.SOCK_STREAM)
    try:
        _set_recverr(sock, True)
        sock.setblocking(False)
        deadline = time.monotonic() + timeout
        err = sock.connect_ex((dst, port))
        if err not in (0, errno.EINPROGRESS):
            raise _Failed(err, "connect")
        poller = select.poll()
        poller.register(sock, select.POLLOUT | select.POLLERR)
        while err != 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Failed(None, "connect")
            events = poller.poll(max(1, int(remaining * 1000)))
            if not events:
                continue
            so_error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if so_error:
                raise _Failed(so_error, "connect")
            icmp_errno = _pop_icmp_errno(sock)
            if icmp_errno:
                raise _Failed(icmp_errno, "icmp")
            if events[0][1] & select.POLLOUT:
                err = 0
        # Established: behave like a normal application from here on (RECVERR would turn ICMP
        # errors on an established connection into hard errors). Turning it off purges the queue.
        _set_recverr(sock, False)
        sock.setblocking(True)
    except BaseException:
        sock.close()
        raise
    return sock


def open_tcp(ns: str, dst: str, port: int, timeout: float = 1.0) -> TcpSession:
    """Connect from namespace ``ns`` and return the held-open session; raises ProbeError on failure."""
    t0 = time.monotonic()
    try:
        sock = _connect(ns, dst, port, timeout)
    except _Failed as failed:
        raise ProbeError(failed.outcome(t0), f"tcp connect {ns} -> [{dst}]:{port}") from None
    return TcpSession(sock, ns, dst, port)


def tcp_probe(ns: str, dst: str, port: int, timeout: float = 1.0) -> Outcome:
    """tcp_connect with errno, stage and elapsed time."""
    t0 = time.monotonic()
    try:
        sock = _connect(ns, dst, port, timeout)
    except _Failed as failed:
        return failed.outcome(t0)
    with TcpSession(sock, ns, dst, port) as session:
        out = session.exchange_ex(PROBE_LINE, timeout)
    result = "open" if out.result == "ok" else out.result
    return Outcome(result, out.errno, out.stage, time.monotonic() - t0)


def tcp_connect(ns: str, dst: str, port: int, timeout: float = 1.0) -> str:
    """Connect, send a line, expect it echoed: "open" | "reset" | "unreachable" | "timeout" | ...

    ``timeout`` bounds the connect and, separately, the echo wait (so at most 2 x timeout).
    """
    return tcp_probe(ns, dst, port, timeout).result


def udp_probe(ns: str, dst: str, port: int, timeout: float = 1.0, payload: bytes = PROBE_LINE) -> Outcome:
    """udp_echo with errno, stage and elapsed time."""
    t0 = time.monotonic()
    stage = "connect"
    with netns_socket(ns, family_of(dst), socket.SOCK_DGRAM) as sock:
        _set_recverr(sock, True)
        sock.settimeout(timeout)
        try:
            sock.connect((dst, port))
            stage = "send"
            sock.send(payload)
            stage = "recv"
            data = sock.recv(65535)
        except OSError as exc:
            return _Failed.from_os(exc, stage).outcome(t0, refused_word="refused")
    result = "reply" if data == payload else "mismatch"
    return Outcome(result, None, "" if result == "reply" else "recv", time.monotonic() - t0)


def udp_echo(ns: str, dst: str, port: int, timeout: float = 1.0, payload: bytes = PROBE_LINE) -> str:
    """Send one datagram on a connected socket: "reply" | "refused" | "unreachable" | "timeout".

    IP_RECVERR is set so every ICMP error counts (plain UDP sockets ignore host/net-unreachable).
    """
    return udp_probe(ns, dst, port, timeout, payload).result


def ping(ns: str, dst: str, timeout: float = 1.0) -> bool:
    """One ICMP/ICMPv6 echo from ``ns`` using iputils ping; True if a reply arrived in time."""
    argv = ["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c1", "-W", f"{timeout:g}"]
    if family_of(dst) == socket.AF_INET6:
        argv.append("-6")
    proc = run([*argv, dst], timeout=timeout + 5.0, check=False)
    return proc.returncode == 0


def scapy_send(ns: str, specs: Sequence[dict[str, Any]] | dict[str, Any], timeout: float = 20.0) -> int:
    """Send crafted packets from ``ns`` (see netns_fixtures.craft); returns how many left the socket.

    Packets the output hook refused (EPERM) are not counted and raise nothing.

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


def l3(pkt: Any) -> Any:
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

    layer = l3(pkt)
    if layer is None:
        return None
    return int(layer.proto) if isinstance(layer, IP) else int(layer.nh)


class Sniffer:
    """tcpdump inside a namespace for the duration of a ``with`` block; packets parsed with scapy.

    The default is the world's ``eth0``: with ``iface="any"`` (Linux cooked v2 frames, every
    interface) tcpdump was measured here to miss some packets of a burst sent back-to-back, which a test
    that proves "nothing passed" cannot afford. With ``any``, a forwarded packet shows up once per
    interface it crosses.
    """

    def __init__(self, ns: str, iface: str = "eth0", bpf: str = "", *, ready_timeout: float = 5.0) -> None:
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
        try:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                preexec_fn=set_parent_death_signal,
            )
            self._wait_listening()
        except BaseException:
            self._discard()
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
            self._discard()

    def _discard(self) -> None:
        """Kill tcpdump and drop the capture (error paths)."""
        self._kill()
        self._proc = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    # ------------------------------------------------------------------ queries on captured packets
    def ip_packets(self) -> list[Any]:
        """Captured packets that have an IP or IPv6 layer."""
        return [p for p in self.packets if l3(p) is not None]

    def packets_to(self, dst: str, proto: int | None = None) -> list[Any]:
        """Packets whose outer IP/IPv6 destination is ``dst`` (optionally with protocol number)."""
        want = _canon(dst)
        return [
            p
            for p in self.ip_packets()
            if _canon(l3(p).dst) == want and (proto is None or l3_proto(p) == proto)
        ]

    def packets_from(self, src: str, proto: int | None = None) -> list[Any]:
        """Packets whose outer IP/IPv6 source is ``src`` (optionally with protocol number)."""
        want = _canon(src)
        return [
            p
            for p in self.ip_packets()
            if _canon(l3(p).src) == want and (proto is None or l3_proto(p) == proto)
        ]

    def count(self, fn: Callable[[Any], bool]) -> int:
        """Number of captured packets for which ``fn(packet)`` is true."""
        return sum(1 for p in self.packets if fn(p))


def _canon(addr: str) -> str:
    import ipaddress

    return str(ipaddress.ip_address(addr))
