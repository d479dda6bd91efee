"""Low-level helpers: run `ip` with timeouts, and create sockets inside a named network namespace.

Everything here targets namespaces by name (``/run/netns/NAME``); nothing touches the caller's own
namespace except switching the *current thread* in and straight back out again.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

NETNS_DIR = Path("/run/netns")
CLONE_NEWNET = 0x40000000
# Directory that contains the netns_fixtures package; put on PYTHONPATH of helper subprocesses so
# `python -m netns_fixtures.server` works no matter how the caller's process found the package.
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)
_PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,23}$")


class CommandError(RuntimeError):
    """A helper command failed; carries argv and stderr so test failures explain themselves."""

    def __init__(self, argv: Sequence[str], returncode: int | None, stderr: str) -> None:
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr
        super().__init__(f"{' '.join(argv)!s} failed (rc={returncode}): {stderr.strip()}")


def validate_prefix(prefix: str) -> str:
    """Reject prefixes that could match unrelated namespaces or break interface/namespace names."""
    if not _PREFIX_RE.fullmatch(prefix):
        raise ValueError(
            f"namespace prefix {prefix!r} must be 2-24 chars of [A-Za-z0-9_-], starting alphanumeric"
        )
    return prefix


def netns_path(name: str) -> str:
    """Path of the bind-mounted namespace file that `ip netns add` creates."""
    return str(NETNS_DIR / name)


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 10.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command without a shell, always with a timeout, raising CommandError on failure."""
    try:
        proc = subprocess.run(
            list(argv), input=input, capture_output=True, text=True, timeout=timeout, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(argv, None, f"timed out after {timeout}s") from exc
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr)
    return proc


def ip_batch(
    lines: Sequence[str], ns: str | None = None, *, timeout: float = 10.0, force: bool = False
) -> None:
    """Feed many `ip` commands to one process (fast); ``ns`` selects the target namespace via -n."""
    argv = ["ip"]
    if ns is not None:
        argv += ["-n", ns]
    if force:
        argv.append("-force")
    argv += ["-batch", "-"]
    run(argv, input="\n".join(lines) + "\n", timeout=timeout, check=not force)


def nsexec(
    ns: str,
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = 10.0,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    """Run a command inside namespace ``ns`` (via `ip netns exec`), e.g. nft or conntrack."""
    return run(["ip", "netns", "exec", ns, *argv], input=input, timeout=timeout, check=check)


def list_namespaces(prefix: str) -> list[str]:
    """Names under /run/netns that start with ``prefix`` (sorted)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n.startswith(prefix))


def netns_pids(ns: str) -> list[int]:
    """PIDs of processes whose network namespace is ``ns`` (so they can be killed before deletion)."""
    proc = run(["ip", "netns", "pids", ns], timeout=10.0, check=False)
    if proc.returncode != 0:
        return []
    return [int(tok) for tok in proc.stdout.split() if tok.isdigit()]


def kill_pids(pids: Sequence[int], *, grace: float = 1.0) -> None:
    """SIGTERM, wait up to ``grace`` seconds, then SIGKILL whatever is left."""
    alive = [p for p in pids if p != os.getpid()]
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if _pid_alive(p)]
        if alive:
            time.sleep(0.02)
    for pid in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def close_helper(proc: subprocess.Popen[Any]) -> None:
    """End a helper process that takes its commands on stdin: close its stdin (its cue to exit), wait, and
    kill it after 5 s; then close its stdout."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            assert proc.stdin is not None
            proc.stdin.close()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    if proc.stdout is not None:
        proc.stdout.close()


def _pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (zombies of other parents cannot be reaped here)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def _is_own_netns(name: str) -> bool:
    """True if the name is bound to the namespace this process (or init) runs in.

    Guard for cleanup(): a name like that (e.g. made with `ip netns attach NAME 1`) must never make
    us kill every process of the machine's own namespace.
    """
    try:
        target = os.stat(netns_path(name))
    except FileNotFoundError:
        return False
    for own in ("/proc/self/ns/net", "/proc/thread-self/ns/net", "/proc/1/ns/net"):
        try:
            st = os.stat(own)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino):
            return True
    return False


def delete_namespaces(names: Sequence[str]) -> None:
    """Kill processes inside, then `ip netns del` each name; missing names are ignored."""
    present = [n for n in names if os.path.exists(netns_path(n))]
    if not present:
        return
    pids: list[int] = []
    for name in present:
        if not _is_own_netns(name):
            pids += netns_pids(name)
    kill_pids(pids)
    ip_batch([f"netns del {n}" for n in present], force=True)
    leftover = [n for n in present if os.path.exists(netns_path(n))]
    if leftover:
        raise CommandError(["ip", "netns", "del", *leftover], None, "namespaces still present after delete")


@functools.cache
def _libc() -> ctypes.CDLL:
    """libc handle for setns(2) (os.setns only exists from Python 3.12)."""
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def set_parent_death_signal() -> None:
    """preexec_fn for helper processes: SIGTERM them if the thread that started them dies.

    Survives the exec of `ip netns exec` into the real program, so a crashed test run cannot leave
    e.g. tcpdump running forever (cleanup(prefix) would also find it).
    """
    pr_set_pdeathsig = 1
    _libc().prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _setns(fd: int) -> None:
    if _libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def in_netns(ns: str) -> Iterator[None]:
    """Switch the *calling thread* into namespace ``ns`` and always back again.

    setns(CLONE_NEWNET) only affects the calling thread, so other threads are never affected and no
    lock is needed; keep the body tiny (create sockets, nothing that blocks or spawns threads).
    A socket keeps the namespace it was created in after we switch back.
    """
    target = os.open(netns_path(ns), os.O_RDONLY | os.O_CLOEXEC)
    try:
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(target)
            try:
                yield
            finally:
                try:
                    _setns(original)
                except OSError as exc:  # pragma: no cover - never seen; would strand the thread
                    raise RuntimeError(f"thread could not return to its own netns: {exc}") from exc
        finally:
            os.close(original)
    finally:
        os.close(target)


def netns_socket(ns: str, family: int, type: int, proto: int = 0) -> socket.socket:
    """Create a socket that lives in namespace ``ns``; the caller's thread stays where it was."""
    with in_netns(ns):
        return socket.socket(family, type, proto)


def family_of(addr: str) -> int:
    """AF_INET6 for addresses containing ':' else AF_INET."""
    return socket.AF_INET6 if ":" in addr else socket.AF_INET
