"""The socket that hears one namespace's nftables events, and how many such sockets fit.

A socket belongs to the namespace it was made in, so it is made by a thread inside that namespace and then
moved to a descriptor at or above FD_BASE (common/fds.py: libnftables 1.0.6, in this same process, aborts
on a descriptor of 1024 or more, so the low ones are left to it). Kept apart from the monitor so that the
agent, the integration tests and the benchmarks make and count these sockets the same way.
"""

from __future__ import annotations

import logging
import resource
import socket
from collections.abc import Callable

from egressd.common.fds import FD_BASE, move_high
from egressd.common.logs import log
from egressd.kernel.netns import NsId, in_netns
from egressd.kernel.nflog import bind_log_group
from egressd.kernel.nfnl import TIMEOUT_S, NetlinkError, listening_socket, ruleset_generation

# Netlink constants, checked against linux/netlink.h and linux/netfilter/nfnetlink.h (and against this
# kernel: see tests/integration/test_monitor.py).
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNLGRP_NFTABLES = 7

FD_HEADROOM = 64  # high descriptors left unused, for whatever else needs one once the low ones run out
RCVBUF = 1 << 20  # per socket; memory is used only while events wait to be read
GENERATION_SEQ = 0x6567  # the one request a monitor socket sends; events carry their committers' numbers


def raise_fd_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE up to the hard limit (monitor sockets need one descriptor each); (soft, hard)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (OSError, ValueError) as e:
            log(logging.WARNING, "fd_limit_not_raised", soft=soft, hard=hard, error=str(e))
        else:
            soft = hard
    return soft, hard


def fd_capacity(soft_limit: int, fd_base: int = FD_BASE) -> int:
    """How many monitor sockets fit between fd_base and the soft limit, leaving some headroom."""
    if soft_limit == resource.RLIM_INFINITY:
        soft_limit = 1 << 20
    return max(0, soft_limit - fd_base - FD_HEADROOM)


def _subscribed_socket(rcvbuf: int) -> socket.socket:
    """Run inside the target namespace: a netfilter netlink socket in the nftables event group."""
    sock = listening_socket(rcvbuf)
    try:
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
    except OSError:
        sock.close()
        raise
    return sock


def open_monitor_socket(
    path: str,
    fd_base: int = FD_BASE,
    rcvbuf: int = RCVBUF,
    setns: Callable[[int, int], int] | None = None,
) -> tuple[socket.socket, NsId]:
    """A non-blocking socket hearing nftables events of the namespace at path, at a descriptor >= fd_base.

    Blocks briefly and enters the namespace on the calling thread, so call it from a helper thread. The
    path goes through the same checks as every namespace egressd touches (open_netns: a network namespace,
    never the agent's own). Raises NetnsError, or OSError (EMFILE, EINVAL: no high descriptor is free).
    """
    sock, ident, _ = open_watch(path, fd_base, rcvbuf, setns)
    return sock, ident


def _generation(sock: socket.socket) -> int | None:
    """The namespace's ruleset generation, asked on the socket that already hears its events (a second
    socket, closed right after egressd's write there, would wait out an RCU grace period). Events read
    before the reply are dropped: the generation, read after them, counts their commits. None when it
    cannot be read (the monitor then checks the table, as without it)."""
    sock.settimeout(TIMEOUT_S)
    try:
        return ruleset_generation(sock, GENERATION_SEQ, strict=False)
    except (OSError, NetlinkError):
        return None


def _bind_log(sock: socket.socket, group: int, path: str) -> None:
    """The same socket hears the packets the namespace's table logs (kernel/nflog.py: denials). Without
    them the watch still works: said once, never fatal."""
    try:
        bind_log_group(sock, group)
    except (OSError, NetlinkError) as e:
        log(
            logging.WARNING,
            "denial_log_unavailable",
            netns=path,
            group=group,
            error=str(e),
            detail="denials of this sandbox are not reported; enforcement is unchanged",
        )


def open_watch(
    path: str,
    fd_base: int = FD_BASE,
    rcvbuf: int = RCVBUF,
    setns: Callable[[int, int], int] | None = None,
    log_group: int | None = None,
) -> tuple[socket.socket, NsId, int | None]:
    """open_monitor_socket(), and the namespace's ruleset generation read once the socket listens: every
    commit after it is heard, every commit before it is counted in it. log_group: also bound to that
    NFLOG group (before the generation is read: events skipped meanwhile are counted in it)."""

    def subscribed() -> tuple[socket.socket, int | None]:
        sock = _subscribed_socket(rcvbuf)
        if log_group is not None:
            _bind_log(sock, log_group, path)
        return sock, _generation(sock)

    (low, generation), ident = in_netns(path, subscribed, setns)
    sock = move_high(low, fd_base)
    sock.setblocking(False)
    return sock, ident, generation
