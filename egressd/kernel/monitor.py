"""Tamper repair within moments: nftables change events from every watched sandbox namespace.

Without this, a table deleted or altered inside a sandbox is put back only by the periodic resync. Here,
per watched sandbox, one netlink socket made inside its namespace joins the NFNLGRP_NFTABLES multicast
group: the kernel sends it one message per object a committed transaction changed there, then NEWGEN,
which names the committing thread. A transaction that touched table `egressd` and was committed by any
thread other than this process's own makes the sandbox dirty in the reconciler's queue; the worker then
reads the table, compares it with what it wrote, and rewrites it if it differs.

No thread per namespace: every socket is non-blocking and read by the event loop (`loop.add_reader`). A
single helper thread makes the sockets, because a socket belongs to the namespace it was made in and only a
thread inside that namespace can make it there.

Descriptors: one per watched sandbox. libnftables 1.0.6 (in this same process) waits on its own socket with
select() and aborts the process if that descriptor is 1024 or more, so every monitor socket is moved to a
descriptor at or above FD_BASE, leaving the low ones to libnftables, and the soft RLIMIT_NOFILE is raised
to the hard limit at start. With a hard limit too low for every sandbox, the first ones are watched and the
rest are left to the resync (logged as `monitor_full`); they are watched when descriptors free up.

When unsure, trigger: a spurious trigger costs one table read and compare; a missed one leaves a sandbox
open until the next resync. Lost events (ENOBUFS), truncated or malformed messages, and message kinds the
decoder (monitor_events.py) does not know all trigger. The sockets are made by monitor_socket.py; the
same sockets hear what the tables log (denials, nflog.py), handed over by _hand_over.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import resource
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

from egressd.common.logs import log
from egressd.kernel.monitor_events import TransactionParser, own_thread_check
from egressd.kernel.monitor_socket import FD_BASE, fd_capacity, open_watch
from egressd.kernel.netns import CLOSE_GRACE_S, NetnsError, NsId, libc_setns, netns_id
from egressd.kernel.nflog import LoggedPacket, is_log_datagram, parse_packets

RECV_BUFFER = 1 << 16  # larger than any notification datagram (the kernel batches them up to a page or so)
DATAGRAMS_PER_WAKE = 64  # then other sockets get their turn; a socket with more stays readable
MIN_GAP = 0.1  # seconds between two triggers of one sandbox: a tenant looping deletes cannot spin us
LOG_DATAGRAMS_PER_S = 50  # egressd's rules make about 10 (one each 0.1 s, nflog.py); a tenant's, any number


@dataclass
class _Watch:
    """One watched sandbox: the path wanted, and the socket once it is open."""

    path: str
    parser: TransactionParser
    sock: socket.socket | None = None
    ident: NsId | None = None
    opening: bool = False
    reason: str | None = None  # why the pending trigger fires, for the log; None: a routine check
    failures: int = 0
    since: tuple[NsId, int] | None = None  # (namespace, generation) before egressd's write, if known
    logs: tuple[int, int] = (0, 0)  # (the second, log datagrams read in it)


def _hand_over(
    packets: Callable[[str, list[LoggedPacket], int], None] | None,
    sid: str,
    w: _Watch,
    view: memoryview,
    stats: MonitorStats,
) -> None:
    """What a table logged, to the denials, at most LOG_DATAGRAMS_PER_S a second per sandbox (egressd's
    own rules are rate-limited; a tenant's own rules logging to the group are not, and each packet costs
    parsing); whatever the denials do, tamper repair goes on."""
    second = int(time.monotonic())
    count = w.logs[1] + 1 if w.logs[0] == second else 1
    w.logs = (second, count)
    if packets is None or count > LOG_DATAGRAMS_PER_S:
        stats.logs_dropped += count > LOG_DATAGRAMS_PER_S
        return
    try:
        packets(sid, *parse_packets(view))
    except Exception as e:  # noqa: BLE001 - a report must never cost a repair
        log(logging.ERROR, "denials_failed", sandbox=sid, error=repr(e))


@dataclass
class MonitorStats:
    triggers: int = 0
    overflows: int = 0
    open_failures: int = 0
    spoofed: int = 0
    checks_spared: int = 0  # first checks left out: the generation proved egressd's write the only commit
    logs_dropped: int = 0  # log datagrams over a sandbox's LOG_DATAGRAMS_PER_S, not read


class ChangeMonitor:
    """Watches the nftables events of sandbox namespaces; calls `callback(sid)` when a sandbox's table may
    have been changed by someone else. Use from the event loop thread only.

    `check_on_watch`: once a socket listens, check the sandbox once, since a change made between the
    table's first write and the subscription would otherwise go unseen (a tenant deleting the table in a
    tight loop would win that race). The daemon turns it off during its first pass, which is followed by
    a full read of every table anyway. The check is spared when the watch was given `since` (the
    namespace, and its ruleset generation before egressd's write) and the socket, once listening, finds
    that namespace one generation on: nothing but that write was committed there in between. That was
    half of what a burst of new sandboxes cost (a full libnftables read each).
    """

    def __init__(
        self,
        callback: Callable[[str], None],
        *,
        fd_base: int = FD_BASE,
        capacity: int | None = None,
        is_own: Callable[[int], bool] | None = None,
        min_gap: float = MIN_GAP,
        opener: Callable[[str], tuple[socket.socket, NsId, int | None]] | None = None,
        packets: Callable[[str, list[LoggedPacket], int], None] | None = None,
        log_group: int | None = None,
    ) -> None:
        self._callback = callback
        self._fd_base = fd_base
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._max_capacity = fd_capacity(soft, fd_base) if capacity is None else capacity
        self.capacity = self._max_capacity  # lowered when the kernel has fewer descriptors than that
        self._is_own = is_own if is_own is not None else own_thread_check()
        self.own_filter = self._is_own is not None
        self._min_gap = min_gap
        setns = libc_setns()  # one libc handle, not one per socket
        self._opener = opener or partial(open_watch, fd_base=fd_base, setns=setns, log_group=log_group)
        self._packets = packets  # what the namespace's table logged (denials): (sid, packets, malformed)
        self._watches: dict[str, _Watch] = {}
        self._starved: dict[str, None] = {}  # sandboxes waiting for a descriptor, oldest first
        self._in_use = 0  # sockets open or being opened
        self._last: dict[str, float] = {}
        self._scheduled: dict[str, asyncio.TimerHandle] = {}
        self._buffer = bytearray(RECV_BUFFER)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="egressd-monitor")
        self._full_logged = False
        self._closed = False
        self.check_on_watch = True
        # While paused (the agent's first pass), watches are recorded but their sockets not made: making
        # 1,000 of them competed with the first pass for the interpreter. resume() makes them all.
        self.paused = False
        self.stats = MonitorStats()

    # --- what to watch --------------------------------------------------------------------------------

    def watch(self, sid: str, path: str | None, since: tuple[NsId, int] | None = None) -> None:
        """Watch the namespace at path for sandbox sid, instead of whatever was watched for it; None: stop.
        since: (the namespace, its ruleset generation) just before egressd's one write there, if known."""
        old = self._watches.pop(sid, None)
        if old is not None:
            self._release(old)
        self._starved.pop(sid, None)
        timer = self._scheduled.pop(sid, None)
        if timer is not None:
            timer.cancel()
        self._last.pop(sid, None)
        if path is not None and not self._closed:
            w = _Watch(path, TransactionParser(self._is_own), since=since)  # identity tells watches apart
            self._watches[sid] = w
            self._open(sid, w)
        self._retry_starved()

    def refresh(self) -> None:
        """Called before each resync: reopen what failed, follow a path that names another namespace now,
        and let go of namespaces whose path is gone (the socket would keep them alive)."""
        self.capacity = self._max_capacity  # try again what a shortage of descriptors held back
        for sid, w in list(self._watches.items()):
            if w.opening or sid in self._starved:
                continue
            if w.sock is None:
                self._open(sid, w)
                continue
            try:
                same = netns_id(w.path) == w.ident
            except NetnsError:
                self._release(w)
                continue
            if not same:
                self._release(w)
                self._open(sid, w)
        self._retry_starved()

    def resume(self) -> None:
        """Make the sockets of every watch recorded while paused."""
        self.paused = False
        for sid, w in list(self._watches.items()):
            if w.sock is None and not w.opening and sid not in self._starved:
                self._open(sid, w)

    async def settled(self, timeout: float) -> bool:
        """Until no socket is being made (after resume()), at most timeout seconds."""
        end = asyncio.get_running_loop().time() + timeout
        while any(w.opening for w in self._watches.values()):
            if asyncio.get_running_loop().time() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    def _open(self, sid: str, w: _Watch) -> None:
        if self.paused:
            return  # resume() makes it
        if self._in_use >= self.capacity:
            self._starved[sid] = None
            if not self._full_logged:
                self._full_logged = True
                log(
                    logging.WARNING,
                    "monitor_full",
                    capacity=self.capacity,
                    detail="no descriptor left for more change monitors (raise the hard RLIMIT_NOFILE, "
                    "LimitNOFILE= under systemd); the other sandboxes are repaired by the resync only",
                )
            return
        self._starved.pop(sid, None)
        self._in_use += 1
        w.opening = True
        loop = asyncio.get_running_loop()

        def done(f: Future[tuple[socket.socket, NsId, int | None]]) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the process is ending anyway
                loop.call_soon_threadsafe(self._opened, sid, w, f)

        self._executor.submit(self._opener, w.path).add_done_callback(done)

    def _opened(self, sid: str, w: _Watch, future: Future[tuple[socket.socket, NsId, int | None]]) -> None:
        w.opening = False
        current = self._watches.get(sid) is w and not self._closed
        if future.cancelled():  # close() stopped the helper thread first
            self._in_use -= 1
            return
        try:
            sock, ident, generation = future.result()
        except (NetnsError, OSError) as e:
            self._in_use -= 1
            if current:
                self._open_failed(sid, w, e)
            self._retry_starved()
            return
        if not current:
            self._in_use -= 1
            sock.close()  # unwatched, or watched elsewhere, while it was being made
            self._retry_starved()
            return
        w.sock, w.ident, w.failures = sock, ident, 0
        w.parser.reset()
        asyncio.get_running_loop().add_reader(sock.fileno(), self._readable, sid, w)
        log(logging.DEBUG, "watching", sandbox=sid, netns=w.path, fd=sock.fileno())
        if not self.check_on_watch:
            return
        if (
            w.since is not None
            and generation is not None
            and w.since == (ident, (generation - 1) & 0xFFFFFFFF)
        ):
            self.stats.checks_spared += 1
        else:
            self._trigger(sid, w)

    def _open_failed(self, sid: str, w: _Watch, e: Exception) -> None:
        self.stats.open_failures += 1
        w.failures += 1
        if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE, errno.EINVAL):
            # No high descriptor free, though the limit said there would be: that is the capacity now.
            self.capacity = min(self.capacity, self._in_use)
            self._starved[sid] = None
        if w.failures == 1:
            log(
                logging.INFO if isinstance(e, NetnsError) and e.gone else logging.WARNING,
                "watch_failed",
                sandbox=sid,
                netns=w.path,
                error=e.reason if isinstance(e, NetnsError) else str(e),
                detail="tried again at each resync, which also repairs the table meanwhile",
            )

    def _retry_starved(self) -> None:
        """Descriptors came free: give them to sandboxes that wait for one, oldest first."""
        while self._starved and self._in_use < self.capacity and not self._closed:
            sid = next(iter(self._starved))
            del self._starved[sid]
            w = self._watches.get(sid)
            if w is not None and w.sock is None and not w.opening:
                self._open(sid, w)
        if not self._starved:
            self._full_logged = False  # a later shortage is logged again

    def _release(self, w: _Watch) -> None:
        """Close w's socket, if it has one (an open in flight is closed when it completes)."""
        w.parser.reset()
        if w.sock is None:
            return
        sock, w.sock = w.sock, None
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop any more (shutdown): nothing is registered then
            sock.close()
        else:
            loop.remove_reader(sock.fileno())
            # Not at once: right after a commit in its namespace (the table's removal, usually) a close
            # waits 15-25 ms in the kernel, and this is the event loop (see ContextCache._close).
            loop.call_later(CLOSE_GRACE_S, sock.close)
        w.ident = None
        self._in_use -= 1

    # --- events ---------------------------------------------------------------------------------------

    def _readable(self, sid: str, w: _Watch) -> None:
        sock = w.sock
        if sock is None or self._watches.get(sid) is not w:
            return
        reason: str | None = None
        buf = self._buffer
        for _ in range(DATAGRAMS_PER_WAKE):
            try:
                n, (sender, _) = sock.recvfrom_into(buf, len(buf), socket.MSG_TRUNC)
            except BlockingIOError:
                break
            except OSError as e:
                w.parser.reset()
                if e.errno == errno.ENOBUFS:
                    self.stats.overflows += 1
                    reason = reason or "events were lost (ENOBUFS)"
                    continue
                reason = reason or f"monitor socket failed: {e.strerror}"
                self._release(w)  # opened again at the next refresh
                break
            if sender != 0:
                # Not from the kernel: a process with CAP_NET_ADMIN in the namespace can send to this
                # socket, and a forged NEWGEN must not hide its real change. Dropped, and checked.
                self.stats.spoofed += 1
                reason = reason or f"a message from netlink port {sender}, not the kernel"
                continue
            if n > len(buf):
                w.parser.reset()
                reason = reason or f"event of {n} bytes truncated"
                continue
            view = memoryview(buf)[:n]
            if is_log_datagram(view):  # a logged packet (denials), not an nftables event
                _hand_over(self._packets, sid, w, view, self.stats)
                continue
            found = w.parser.feed(view)  # always: the parser's state must follow
            reason = reason or found
        if reason is not None:
            w.reason = w.reason or reason
            self._trigger(sid, w)

    def _trigger(self, sid: str, w: _Watch) -> None:
        """At most one callback per sandbox per min_gap; one that comes sooner waits for the gap to end."""
        if sid in self._scheduled:
            return
        loop = asyncio.get_running_loop()
        wait = self._last.get(sid, float("-inf")) + self._min_gap - loop.time()
        if wait > 0:
            self._scheduled[sid] = loop.call_later(wait, self._fire, sid, w)
        else:
            self._fire(sid, w)

    def _fire(self, sid: str, w: _Watch) -> None:
        self._scheduled.pop(sid, None)
        if self._watches.get(sid) is not w or self._closed:
            return
        self._last[sid] = asyncio.get_running_loop().time()
        self.stats.triggers += 1
        reason, w.reason = w.reason, None
        if reason is not None:
            log(logging.INFO, "table_changed", sandbox=sid, netns=w.path, detail=reason)
        self._callback(sid)

    # --- reporting and shutdown -----------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """For `status`: how many sandboxes are watched, and what the monitor saw."""
        return {
            "watched": sum(1 for w in self._watches.values() if w.sock is not None),
            "waiting_for_descriptors": len(self._starved),
            "capacity": self.capacity,
            "own_filter": self.own_filter,
            **dataclasses.asdict(self.stats),  # triggers, overflows, open_failures, spoofed, checks_spared
        }

    def close(self) -> None:
        """Close every socket (each keeps its namespace alive) and stop the helper thread."""
        self._closed = True
        for timer in self._scheduled.values():
            timer.cancel()
        self._scheduled.clear()
        for w in self._watches.values():
            self._release(w)
        self._watches.clear()
        self._starved.clear()
        self._executor.shutdown(wait=True, cancel_futures=True)
