"""Network namespace handles, and one cached libnftables context per namespace.

A libnftables context binds its netlink socket when it is created, so we enter the namespace on this thread
only for the instant of creation and then talk to it from anywhere. egressd never creates a namespace: paths
are opened read-only and checked to be network namespaces before they are used.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import stat
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from egressd.common.libc import libc

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
CLOSE_GRACE_S = 0.1  # see ContextCache._close
GRAVEYARD_MAX = 64  # contexts waiting out CLOSE_GRACE_S at most; beyond, the oldest is freed at once
NS_GET_NSTYPE = 0xB703  # ioctl on an nsfs file descriptor: which kind of namespace it is


class NetnsError(Exception):
    """A namespace path cannot be used; `gone` tells a missing namespace (retry later) from a bad path."""

    def __init__(self, path: str, reason: str, gone: bool = False) -> None:
        self.path = path
        self.reason = reason
        self.gone = gone
        super().__init__(f"netns {path}: {reason}")


@dataclass(frozen=True)
class NsId:
    """Identity of a namespace: a path can later name a different namespace, its inode cannot."""

    dev: int
    ino: int


def libc_setns() -> Callable[[int, int], int]:
    """setns(2) from libc (os.setns only exists from Python 3.12); the backends and the monitor share it."""
    fn = libc().setns
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


@functools.cache
def _own_netns_ids() -> frozenset[NsId]:
    """The agent's own namespace and the host's (pid 1): a sandbox must never be either. Looked up once
    (neither changes while the agent runs): two stats per namespace opened were a tenth of a restart."""
    ids = set()
    for p in ("/proc/thread-self/ns/net", "/proc/1/ns/net"):
        try:
            st = os.stat(p)
        except OSError:
            continue
        ids.add(NsId(st.st_dev, st.st_ino))
    return frozenset(ids)


def open_netns(path: str) -> tuple[int, NsId]:
    """Open path read-only and prove it is a network namespace other than our own; returns (fd, id)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NetnsError(path, "does not exist (yet); waiting for it to appear", gone=True) from None
    except IsADirectoryError:
        raise NetnsError(path, "is a directory, not a network namespace") from None
    except OSError as e:
        if e.errno in (errno.ESRCH, errno.ENOENT):
            raise NetnsError(path, "process or namespace is gone", gone=True) from None
        raise NetnsError(path, f"cannot open: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise NetnsError(path, "is a directory, not a network namespace")
        if stat.S_ISREG(st.st_mode) and st.st_size > 0:
            raise NetnsError(path, "is a regular file, not a network namespace")
        try:
            kind = fcntl.ioctl(fd, NS_GET_NSTYPE)
        except OSError:
            if stat.S_ISREG(st.st_mode):
                # `ip netns add` and CNI plugins create an empty file, then bind-mount the namespace onto it
                # (and `ip netns del` leaves one for an instant): wait for it like a missing path.
                reason = "no namespace is mounted on it (yet, or any more)"
                raise NetnsError(path, reason, gone=True) from None
            raise NetnsError(
                path, "is not a namespace file (expected /run/netns/NAME or /proc/PID/ns/net)"
            ) from None
        if kind != CLONE_NEWNET:
            raise NetnsError(path, "is a namespace, but not a network namespace")
        ident = NsId(st.st_dev, st.st_ino)
        if ident in _own_netns_ids():
            raise NetnsError(path, "is the agent's own (host) network namespace; refusing to touch it")
    except BaseException:
        os.close(fd)
        raise
    return fd, ident


def enter_and_call(fd: int, fn: Callable[[], T], setns: Callable[[int, int], int], home: int) -> T:
    """fn() on this thread while it is inside the namespace fd; always back home after.

    What fn makes there (a netlink socket) stays bound to that namespace, which is the point."""
    if setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns into sandbox namespace failed: {os.strerror(err)}")
    try:
        return fn()
    finally:
        if setns(home, CLONE_NEWNET) != 0:
            # This thread is stuck in a sandbox namespace; nothing it does next can be trusted.
            err = ctypes.get_errno()
            raise SystemExit(f"egressd: cannot return to the host namespace: {os.strerror(err)}")


def in_netns(
    path: str, fn: Callable[[], T], setns: Callable[[int, int], int] | None = None
) -> tuple[T, NsId]:
    """enter_and_call() for a path, checked like every namespace egressd touches (open_netns); also
    returns the identity of the namespace fn ran in.

    Raises NetnsError for a path that cannot be used, OSError when entering fails."""
    fd, ident = open_netns(path)
    try:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return enter_and_call(fd, fn, setns or libc_setns(), home), ident
        finally:
            os.close(home)
    finally:
        os.close(fd)


def netns_id(path: str) -> NsId:
    """The current identity of path, without opening a handle."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise NetnsError(path, "does not exist (any more)", gone=True) from None
    except OSError as e:
        raise NetnsError(path, f"cannot stat: {e.strerror}", gone=e.errno == errno.ESRCH) from None
    return NsId(st.st_dev, st.st_ino)


@dataclass
class _Entry:
    ident: NsId
    ctx: Any


def _free(ctx: Any) -> None:
    """Let go of a context: closed now if it can be (a raw socket: a reference cycle must not keep its
    namespace alive until the collector runs), else freed with its last reference (libnftables')."""
    close = getattr(ctx, "close", None)
    if callable(close):
        close()


class ContextCache:
    """One object per namespace path, made by `factory` while this thread is inside that namespace.

    The cached object (a libnftables context) keeps its namespace alive through its netlink socket, so
    `drop` must be called when a sandbox goes away. `get` notices when the path now names a different
    namespace and starts afresh. No namespace file descriptor is kept: libnftables 1.0.6 waits on its socket
    with select(), which aborts the process for a descriptor at or above 1024, so descriptors are scarce.
    For the same reason at most `limit` contexts are kept; the least recently used is closed first and
    made again (about 0.3 ms) when needed.
    """

    def __init__(
        self,
        factory: Callable[[], Any],
        limit: int = 256,
        free_lock: threading.Lock | None = None,
        graveyard: int = GRAVEYARD_MAX,
    ) -> None:
        self._factory = factory
        self._limit = limit
        self._graveyard_max = graveyard
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._lock = threading.Lock()
        # Contexts let go of, with when they may be freed (see CLOSE_GRACE_S). One thread frees them, holding
        # free_lock (the lock every libnftables call holds: freeing a context is a libnftables call too) and
        # then self._lock, the order every other caller takes them in.
        self._graveyard: deque[tuple[float, Any]] = deque()
        self._free_lock = free_lock or threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._reaper: threading.Thread | None = None
        self._setns = libc_setns()
        self._home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)

    def get(self, path: str) -> tuple[Any, bool]:
        """The context for path, and whether it was (re)made now rather than reused. A context is made
        outside the lock (entering the namespace and making its socket: about 1 ms), so the workers make
        theirs side by side and nobody waits on them for a lookup; were two made for one path at once, the
        first one in stays and the other is let go of."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                try:
                    same = netns_id(path) == entry.ident
                except NetnsError:
                    # Gone: let go of its context now, or its netlink socket keeps the dead namespace alive.
                    self._close(path)
                    raise
                if same:
                    self._entries.move_to_end(path)
                    return entry.ctx, False
                self._close(path)
        fd, ident = open_netns(path)
        try:
            ctx = enter_and_call(fd, self._factory, self._setns, self._home)
        finally:
            os.close(fd)
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None and entry.ident == ident:
                self._bury(ctx)
                self._entries.move_to_end(path)
                return entry.ctx, False
            if entry is not None:
                self._close(path)
            self._entries[path] = _Entry(ident, ctx)
            while len(self._entries) > self._limit:
                self._close(next(iter(self._entries)))
            return ctx, True

    def ident(self, path: str) -> NsId | None:
        with self._lock:
            entry = self._entries.get(path)
            return entry.ident if entry else None

    def _close(self, path: str) -> None:
        """Closing a netlink socket within ~30 ms of a commit in its namespace waits for an RCU grace period
        in the kernel (15-25 ms measured), and callers hold locks: a context is therefore freed (its last
        reference dropped, which closes its socket) CLOSE_GRACE_S later, by a timer, unless the cache is
        closed first. Deleting 5,000 sandboxes took 82-122 s before, one grace period each."""
        entry = self._entries.pop(path, None)
        if entry is None:
            return
        self._bury(entry.ctx)
        entry.ctx = None

    def _bury(self, ctx: Any) -> None:
        """Free ctx CLOSE_GRACE_S from now, by the reaper thread (see _close). Called holding self._lock."""
        self._graveyard.append((time.monotonic() + CLOSE_GRACE_S, ctx))
        while len(self._graveyard) > self._graveyard_max:  # a context's descriptor is below 1024: kept few
            _free(self._graveyard.popleft()[1])  # callers hold free_lock when they can get here
        if self._reaper is None:
            self._reaper = threading.Thread(target=self._reap_loop, name="egressd-free", daemon=True)
            self._reaper.start()
        self._wake.notify()

    def _reap_loop(self) -> None:
        """Free each context once its grace has passed (the last reference goes: libnftables frees it and
        closes its socket)."""
        while True:
            with self._lock:
                while not self._closed and (not self._graveyard or self._graveyard[0][0] > time.monotonic()):
                    self._wake.wait(self._graveyard[0][0] - time.monotonic() if self._graveyard else None)
                if self._closed:
                    return
            with self._free_lock, self._lock:
                now = time.monotonic()
                while self._graveyard and self._graveyard[0][0] <= now:
                    _free(self._graveyard.popleft()[1])

    def drop(self, path: str) -> None:
        """Forget path's context so the kernel can free a namespace that is gone."""
        with self._lock:
            self._close(path)

    def __len__(self) -> int:
        return len(self._entries)

    def close(self) -> None:
        with self._lock:
            for path in list(self._entries):
                self._close(path)
            self._closed = True
            while self._graveyard:
                _free(self._graveyard.popleft()[1])
            self._wake.notify()
            if self._home >= 0:
                os.close(self._home)
                self._home = -1
