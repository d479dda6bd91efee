"""A real DNS server (Debian's dnsmasq) in a world's internet namespace, with answers a test can change.

dnsmasq answers every name under ``.test`` (RFC 6761) from a hosts file this module rewrites; names not in
the file are NXDOMAIN and nothing is ever forwarded. Each query dnsmasq receives is one ``query[TYPE] NAME
from ADDR`` line in its log file, which is how ``queries()`` counts. The fixture's own checks (readiness,
"is the new answer served yet") are sent from ``CONTROL_SOURCE`` and are never counted.

Measured with dnsmasq 2.90 (Debian 12); see README.md for the behaviour tests can rely on.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar

import dns.exception
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype

from netns_fixtures._nsutil import (
    CommandError,
    _is_own_netns,
    in_netns,
    netns_path,
    run,
    set_parent_death_signal,
)
from netns_fixtures.world import INET_LOCAL_V4, INET_LOCAL_V6, World

T = TypeVar("T")

DNSMASQ = "dnsmasq"
DEFAULT_ADDRESS = "198.51.100.53"
DEFAULT_ADDRESS6 = "2001:db8:53::53"
# The fixture's own queries come from this loopback address inside the server's namespace, so the
# query log can tell them apart from the queries a test makes (those are never sent from 127.0.0.53).
CONTROL_SOURCE = "127.0.0.53"
ZONE = "test"
READY_TIMEOUT = 5.0
CHANGE_TIMEOUT = 2.0
STOP_TIMEOUT = 2.0
POLL_QUERY_TIMEOUT = 0.2
_QUERY_RE = re.compile(r": query\[(?P<qtype>[^\]]+)\] (?P<name>\S+) from (?P<source>\S+)$")
_LABEL_RE = re.compile(r"^[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?$")


@dataclass(frozen=True)
class DnsQuery:
    """One query as dnsmasq logged it on arrival (name lower-cased, no trailing dot)."""

    name: str
    qtype: str
    source: str


def call_in_netns(ns: str, fn: Callable[[], T], *, timeout: float = 5.0) -> T:
    """Run ``fn`` in a short-lived thread that has entered namespace ``ns``; return its result.

    Why: libraries such as dnspython create their own sockets, and setns(2) is per thread, so a
    dedicated thread that enters the namespace, runs the blocking call and exits is the clean way to
    put those sockets in ``ns``. Exceptions from ``fn`` are re-raised here; ``timeout`` is a safety
    bound on top of ``fn``'s own (TimeoutError if exceeded).
    """

    def body() -> T:
        with in_netns(ns):
            return fn()

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{ns}")
    try:
        return pool.submit(body).result(timeout=timeout)
    except FutureTimeout:
        raise TimeoutError(f"call in netns {ns} did not finish within {timeout}s") from None
    finally:
        pool.shutdown(wait=False)


def dns_query(
    ns: str,
    server: str,
    name: str,
    qtype: str = "A",
    *,
    tcp: bool = False,
    timeout: float = 1.0,
    source: str | None = None,
    port: int = 53,
) -> dns.message.Message:
    """One DNS query from namespace ``ns`` to ``server`` (UDP, or TCP); returns the whole response.

    Raises ``dns.exception.Timeout`` when nothing answers within ``timeout`` (a paused or stopped
    server over UDP); over TCP a stopped server gives ConnectionRefusedError.
    """
    query = dns.message.make_query(name, qtype)

    def ask() -> dns.message.Message:
        if tcp:
            return dns.query.tcp(query, server, timeout=timeout, port=port, source=source)
        return dns.query.udp(query, server, timeout=timeout, port=port, source=source)

    return call_in_netns(ns, ask, timeout=timeout + 2.0)


def answer_addresses(response: dns.message.Message) -> set[str]:
    """Every A/AAAA address in a response's answer section (after any CNAMEs), canonical form."""
    out: set[str] = set()
    for rrset in response.answer:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            out.update(str(ipaddress.ip_address(rd.address)) for rd in rrset)
    return out


def _canon_name(name: str) -> str:
    """Lower-case, no trailing dot, and under .test: dnsmasq only owns that zone here."""
    canon = name.strip().rstrip(".").lower()
    labels = canon.split(".")
    if len(canon) > 253 or len(labels) < 2 or labels[-1] != ZONE:
        raise ValueError(f"{name!r}: only names under .{ZONE} are served")
    if not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError(f"{name!r} is not a valid host name")
    return canon


def _canon_addresses(addresses: Iterable[str]) -> list[str]:
    """Canonical, de-duplicated (order kept); raises ValueError on anything that is not an IP."""
    out: list[str] = []
    for text in addresses:
        addr = str(ipaddress.ip_address(text))
        if addr not in out:
            out.append(addr)
    return out


class DnsServer:
    """dnsmasq under ``ip netns exec`` in the world's inet namespace, serving ``.test`` from a hosts file.

    ``set()``/``remove()`` rewrite the hosts file and SIGHUP dnsmasq (it re-reads addn-hosts on SIGHUP);
    ``cname()`` needs a restart because dnsmasq reads ``--cname`` only at start. Every change returns
    only once dnsmasq serves the new answer. Not thread-safe: drive one server from one thread.
    """

    def __init__(
        self,
        world_or_ns: World | str,
        *,
        address: str = DEFAULT_ADDRESS,
        address6: str | None = DEFAULT_ADDRESS6,
        ttl: int = 2,
        workdir: str | None = None,
        records: Mapping[str, Iterable[str]] | None = None,
        cnames: Mapping[str, str] | None = None,
        ready_timeout: float = READY_TIMEOUT,
        local_zone: bool = True,
    ) -> None:
        """``local_zone=False`` drops ``--local=/test/``: dnsmasq then answers only what its hosts file has,
        and REFUSES everything else, a record type a name lacks included (an IPv4-only name's AAAA)."""
        self.local_zone = local_zone
        self.ns = world_or_ns.inet if isinstance(world_or_ns, World) else world_or_ns
        if ipaddress.ip_address(address).version != 4:
            raise ValueError("address must be IPv4 (use address6 for the IPv6 one)")
        if address6 is not None and ipaddress.ip_address(address6).version != 6:
            raise ValueError("address6 must be IPv6")
        if isinstance(world_or_ns, World):
            _require_documentation(address, address6)
        if ttl < 0:
            raise ValueError("ttl must be >= 0")
        self.address = str(ipaddress.ip_address(address))
        self.address6 = str(ipaddress.ip_address(address6)) if address6 is not None else None
        self.ttl = ttl
        self.ready_timeout = ready_timeout
        self._own_workdir = workdir is None
        self.workdir: str | None = workdir
        self._hosts: dict[str, list[str]] = {}
        self._cnames: dict[str, str] = {}
        for name, addrs in (records or {}).items():
            self._hosts[_canon_name(name)] = _canon_addresses(addrs)
            if not self._hosts[_canon_name(name)]:
                raise ValueError(f"records[{name!r}] has no address")
        for alias, target in (cnames or {}).items():
            self._cnames[_canon_name(alias)] = _canon_name(target)
        if clash := set(self._hosts) & set(self._cnames):
            raise ValueError(f"names are both records and CNAME aliases: {sorted(clash)}")
        self._proc: subprocess.Popen[bytes] | None = None
        self._cmd: list[str] = []
        self._added_address6 = False
        self._paused = False
        self._pending: set[str] = set()  # names changed while paused: verified on resume()
        self._log_offset = 0
        self._closed = False
        self.start_seconds: float | None = None

    # ------------------------------------------------------------------------------- paths, argv
    @property
    def hosts_path(self) -> str:
        """The addn-hosts file dnsmasq serves from."""
        return os.path.join(self._require_workdir(), "hosts")

    @property
    def log_path(self) -> str:
        """dnsmasq's --log-facility file (one line per received query, appended across restarts)."""
        return os.path.join(self._require_workdir(), "dnsmasq.log")

    @property
    def stderr_path(self) -> str:
        """dnsmasq's stderr (with --no-daemon it echoes the log there; start-up errors land here)."""
        return os.path.join(self._require_workdir(), "dnsmasq.stderr")

    def _require_workdir(self) -> str:
        if self.workdir is None:
            raise RuntimeError("DnsServer has no workdir (not started yet, or closed)")
        return self.workdir

    def argv(self) -> list[str]:
        """The dnsmasq command line (without the ``ip netns exec NS`` in front)."""
        argv = [
            DNSMASQ,
            "--conf-file=/dev/null",  # nothing from /etc/dnsmasq.conf
            "--no-daemon",  # foreground, no pid file, no fork per TCP query: pause() stops everything
            "--user=root",  # never switch to user "dnsmasq" (it could not write our root-owned temp dir)
            "--pid-file",  # empty: no pid file
            "--port=53",
            "--no-resolv",  # no upstream servers at all
            "--no-hosts",  # not /etc/hosts
            "--no-poll",
            f"--addn-hosts={self.hosts_path}",
            f"--local-ttl={self.ttl}",
            f"--neg-ttl={self.ttl}",
            "--cache-size=0",
            "--log-queries",
            f"--log-facility={self.log_path}",
            "--bind-interfaces",  # only our addresses, so other tests still get "refused" on port 53
            f"--listen-address={self.address}",
        ]
        if self.address6 is not None:
            argv.append(f"--listen-address={self.address6}")
        if (
            self.local_zone
        ):  # .test is answered locally only: unknown names are NXDOMAIN, missing types NODATA
            argv.append(f"--local=/{ZONE}/")
        argv += [f"--cname={alias},{target}" for alias, target in self._cnames.items()]
        return argv

    # ------------------------------------------------------------------------------- lifecycle
    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    @property
    def running(self) -> bool:
        """True while the dnsmasq process exists (also while paused)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """dnsmasq's pid (``ip netns exec`` execs it, so this is dnsmasq itself); None when not running."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def paused(self) -> bool:
        """True between pause() and resume()."""
        return self._paused and self.running

    def start(self) -> DnsServer:
        """Start dnsmasq and return once it answers a query (no-op if already running)."""
        if self._closed:
            raise RuntimeError("DnsServer already closed")
        if self.running:
            return self
        if not os.path.exists(netns_path(self.ns)):
            raise FileNotFoundError(f"network namespace {self.ns!r} does not exist")
        if _is_own_netns(self.ns):
            raise ValueError(f"{self.ns!r} is this process's own network namespace; refusing to touch it")
        t0 = time.monotonic()
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix=f"dnsmasq-{self.ns}-")
        else:
            os.makedirs(self.workdir, exist_ok=True)
        try:
            self._add_address6()
            self._write_hosts()
            self._spawn()
            self._wait_ready(time.monotonic() + self.ready_timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        return self

    def stop(self) -> None:
        """SIGTERM dnsmasq and wait (SIGKILL after 2 s); keeps the log so counts stay readable."""
        self._terminate()
        self._remove_address6()

    def restart(self) -> DnsServer:
        """Stop and start again (same address, records, log); how CNAME changes take effect."""
        self._terminate()
        return self.start()

    def kill(self) -> None:
        """SIGKILL dnsmasq, like a crash: UDP gets port-unreachable (a timeout for dnspython), TCP is
        refused. start() brings it back with the same records and log."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def close(self) -> None:
        """Stop dnsmasq and remove the temp dir we created (idempotent; never leaves a process)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            if self._own_workdir and self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None

    def pause(self) -> None:
        """SIGSTOP: queries time out (the kernel still queues them; they are answered after resume())."""
        proc = self._require_running()
        proc.send_signal(signal.SIGSTOP)
        _wait_state(proc.pid, "T", CHANGE_TIMEOUT)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT and wait until dnsmasq answers again and serves every change made while paused.

        UDP queries to ``address`` that the kernel queued during the pause are answered late and logged
        before this returns (same socket, FIFO); queued TCP or IPv6 ones are processed right after.
        """
        proc = self._require_running()
        proc.send_signal(signal.SIGCONT)
        self._paused = False
        deadline = time.monotonic() + CHANGE_TIMEOUT
        self._wait_answering(deadline)
        for name in sorted(self._pending):
            self._wait_served(name, deadline)
        self._pending.clear()

    def _require_running(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            raise RuntimeError("dnsmasq is not running")
        return self._proc

    def _spawn(self) -> None:
        self._paused = False
        # `ip netns exec` execs dnsmasq (no fork), so the Popen pid is dnsmasq and signals go straight to it.
        self._cmd = ["ip", "netns", "exec", self.ns, *self.argv()]
        with open(self.stderr_path, "ab") as stderr:
            self._proc = subprocess.Popen(
                self._cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                cwd="/",
                preexec_fn=set_parent_death_signal,  # a crashed test run cannot leave dnsmasq behind
            )

    def _wait_ready(self, deadline: float) -> None:
        proc = self._require_spawned()
        while True:
            if proc.poll() is not None:
                raise CommandError(self._cmd, proc.returncode, self._stderr_tail())
            if self._answers():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq in {self.ns} not answering: {self._stderr_tail()}")
            time.sleep(0.01)

    def _require_spawned(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("dnsmasq was not started")
        return self._proc

    def _terminate(self) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused dnsmasq only sees SIGTERM once continued
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
        self._reap()

    def _reap(self) -> None:
        if self._proc is not None:
            try:
                self._proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL never failed here
                self._proc.kill()
                self._proc.wait(timeout=5.0)
            self._proc = None
        self._paused = False

    def _stderr_tail(self) -> str:
        try:
            with open(self.stderr_path, encoding="utf-8", errors="replace") as fh:
                return fh.read()[-2000:]
        except (OSError, RuntimeError):
            return "<no stderr>"

    def _add_address6(self) -> None:
        """Put address6 on the namespace's lo: unlike IPv4, IPv6 cannot bind or send from an address
        that is only covered by an AnyIP ``local`` route (bind: EADDRNOTAVAIL; replies: EINVAL)."""
        if self.address6 is None or self._added_address6:
            return
        proc = run(
            ["ip", "-n", self.ns, "addr", "add", f"{self.address6}/128", "dev", "lo", "nodad"], check=False
        )
        if proc.returncode == 0:
            self._added_address6 = True
        elif "File exists" not in proc.stderr:
            raise CommandError(proc.args, proc.returncode, proc.stderr)

    def _remove_address6(self) -> None:
        if not self._added_address6:
            return
        self._added_address6 = False
        if os.path.exists(netns_path(self.ns)):  # the world may already be gone, address and all
            run(["ip", "-n", self.ns, "addr", "del", f"{self.address6}/128", "dev", "lo"], check=False)

    # ------------------------------------------------------------------------------- records
    @property
    def records(self) -> dict[str, list[str]]:
        """Copy of the hosts-file records: name -> addresses."""
        return {name: list(addrs) for name, addrs in self._hosts.items()}

    @property
    def cnames(self) -> dict[str, str]:
        """Copy of the CNAMEs: alias -> target."""
        return dict(self._cnames)

    def set(self, name: str, *addresses: str) -> None:
        """Make ``name`` answer exactly ``addresses`` (A and AAAA mixed; a missing family is NODATA).

        Returns once dnsmasq serves it (checked with control queries), or at once while paused
        (resume() checks then). A name that was a CNAME alias stops being one (that restarts dnsmasq).
        """
        canon = _canon_name(name)
        addrs = _canon_addresses(addresses)
        if not addrs:
            raise ValueError("set() needs at least one address; use remove() for NXDOMAIN")
        self._hosts[canon] = addrs
        if canon in self._cnames:
            del self._cnames[canon]
            self._apply_restart()
            return
        self._apply_reload(canon)

    def remove(self, name: str) -> None:
        """Make ``name`` NXDOMAIN (drops its addresses or its CNAME); no-op for an unknown name."""
        canon = _canon_name(name)
        had_hosts = self._hosts.pop(canon, None) is not None
        if self._cnames.pop(canon, None) is not None:
            self._apply_restart()
        elif had_hosts:
            self._apply_reload(canon)

    def cname(self, alias: str, target: str) -> None:
        """Make ``alias`` a CNAME for ``target`` (both under .test); restarts dnsmasq (~60 ms gap).

        dnsmasq reads ``--cname`` only at start (SIGHUP does not re-read it). The target's own
        addresses can still change with set() without a restart: dnsmasq follows the CNAME per query.
        """
        canon_alias, canon_target = _canon_name(alias), _canon_name(target)
        if canon_alias == canon_target:
            raise ValueError("a CNAME cannot point at itself")
        self._hosts.pop(canon_alias, None)
        self._cnames[canon_alias] = canon_target
        self._apply_restart()

    def _apply_reload(self, name: str) -> None:
        self._check_not_died()
        if not self.running:
            return  # start() writes the file
        self._write_hosts()
        self._require_running().send_signal(signal.SIGHUP)  # dnsmasq re-reads --addn-hosts files
        if self._paused:
            self._pending.add(name)
            return
        self._wait_served(name, time.monotonic() + CHANGE_TIMEOUT)

    def _apply_restart(self) -> None:
        self._check_not_died()
        if self.running:
            self._pending.clear()
            self.restart()  # start() writes the file

    def _check_not_died(self) -> None:
        """A change to a server that died behind our back (e.g. its world closed) must not pass silently."""
        if self._proc is not None and self._proc.poll() is not None:
            rc = self._proc.returncode
            raise RuntimeError(f"dnsmasq exited unexpectedly (rc={rc}): {self._stderr_tail()}")

    def _write_hosts(self) -> None:
        """Write the hosts file atomically (rename), so dnsmasq never reads half of it."""
        lines = ["# written by netns_fixtures.dns.DnsServer\n"]
        for name, addrs in self._hosts.items():
            lines += [f"{addr} {name}\n" for addr in addrs]
        tmp = self.hosts_path + ".tmp"
        with open(tmp, "w", encoding="ascii") as fh:
            fh.writelines(lines)
        os.replace(tmp, self.hosts_path)

    # ------------------------------------------------------------------------------- control queries
    def _control(self, name: str, qtype: str) -> dns.message.Message:
        """A fixture query from CONTROL_SOURCE (never counted) on a *connected* UDP socket.

        Why connected: while dnsmasq is not bound yet, the ICMP port-unreachable then fails the query
        at once (ConnectionRefusedError) instead of costing a whole timeout; start() is ~4x faster.
        """
        query = dns.message.make_query(name, qtype)
        server = self.address

        def ask() -> dns.message.Message:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                sock.bind((CONTROL_SOURCE, 0))
                sock.connect((server, 53))
                sock.setblocking(False)
                return dns.query.udp(query, server, timeout=POLL_QUERY_TIMEOUT, sock=sock)

        return call_in_netns(self.ns, ask, timeout=POLL_QUERY_TIMEOUT + 2.0)

    def _answers(self) -> bool:
        try:
            self._control(f"netns-fixtures-ready.{ZONE}", "A")
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def _wait_answering(self, deadline: float) -> None:
        while not self._answers():
            if not self.running:
                raise RuntimeError(f"dnsmasq exited: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq in {self.ns} not answering")
            time.sleep(0.005)

    def _served(self, name: str) -> bool:
        """Does dnsmasq's answer for ``name`` match what we wrote (addresses, or NXDOMAIN)?"""
        want = self._hosts.get(name)
        nothing = dns.rcode.NXDOMAIN if self.local_zone else dns.rcode.REFUSED  # for a name, or one type
        try:
            if want is None:
                return self._control(name, "A").rcode() == nothing
            for qtype, version in (("A", 4), ("AAAA", 6)):
                reply = self._control(name, qtype)
                wanted = {a for a in want if ipaddress.ip_address(a).version == version}
                rcode = dns.rcode.NOERROR if wanted or self.local_zone else nothing
                if reply.rcode() != rcode or answer_addresses(reply) != wanted:
                    return False
        except (dns.exception.DNSException, OSError):
            return False
        return True

    def _wait_served(self, name: str, deadline: float) -> None:
        while not self._served(name):
            if not self.running:
                raise RuntimeError(f"dnsmasq exited: {self._stderr_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"dnsmasq in {self.ns} still serves an old answer for {name}")
            time.sleep(0.005)

    # ------------------------------------------------------------------------------- queries
    def query(
        self,
        ns: str,
        name: str,
        qtype: str = "A",
        *,
        tcp: bool = False,
        v6: bool = False,
        timeout: float = 1.0,
    ) -> dns.message.Message:
        """Ask this server from namespace ``ns`` (counted like any client's query)."""
        server = self.address6 if v6 else self.address
        if server is None:
            raise ValueError("this server has no IPv6 address")
        return dns_query(ns, server, name, qtype, tcp=tcp, timeout=timeout)

    def query_log(self, name: str | None = None, qtype: str | None = None) -> list[DnsQuery]:
        """Queries received since start (or the last reset_counts()), in order, control queries left out."""
        want_name = name.rstrip(".").lower() if name is not None else None
        want_type = qtype.upper() if qtype is not None else None
        out: list[DnsQuery] = []
        for entry in self._read_log():
            if want_name is not None and entry.name != want_name:
                continue
            if want_type is not None and entry.qtype != want_type:
                continue
            out.append(entry)
        return out

    def queries(self, name: str | None = None, qtype: str | None = None) -> int:
        """How many queries reached dnsmasq (optionally for one name and/or type, e.g. "AAAA")."""
        return len(self.query_log(name, qtype))

    def reset_counts(self) -> None:
        """Count from here on (remembers the log file's current end)."""
        self._log_offset = self._log_size()

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.log_path)
        except (FileNotFoundError, RuntimeError):
            return 0

    def _read_log(self) -> list[DnsQuery]:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._log_offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]  # a line still being written is not counted yet
        out = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            match = _QUERY_RE.search(line)
            if match is None or match["source"] == CONTROL_SOURCE:
                continue
            out.append(DnsQuery(match["name"].rstrip(".").lower(), match["qtype"].upper(), match["source"]))
        return out


def _require_documentation(address: str, address6: str | None) -> None:
    """A world's internet only has documentation ranges; anything else would not be local there."""
    checks = [(address, INET_LOCAL_V4)] + ([(address6, INET_LOCAL_V6)] if address6 is not None else [])
    for addr, nets in checks:
        ip = ipaddress.ip_address(addr)
        if not any(ip in ipaddress.ip_network(net) for net in nets):
            raise ValueError(f"{addr} is not in the world's internet ranges {nets}")


def _wait_state(pid: int, state: str, timeout: float) -> None:
    """Wait until /proc says the process is in ``state`` (e.g. "T" once SIGSTOP has landed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
                current = fh.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            raise RuntimeError(f"process {pid} is gone") from None
        if current == state:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"process {pid} is in state {current}, not {state}")
        time.sleep(0.002)
