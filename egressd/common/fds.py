"""Descriptors of 1024 and above for every socket egressd keeps or opens in numbers.

libnftables 1.0.6, in this same process, select()s on the sockets it opens itself and aborts when one of
them gets a descriptor of 1024 or more. So the sockets egressd holds per sandbox (monitor, DNS proxy,
netlink) and the sockets of DNS questions in flight (hundreds at once) are moved up to FD_BASE and above,
and the low descriptors are left to libnftables.
"""

from __future__ import annotations

import errno
import fcntl
import os
import resource
import socket

FD_BASE = 1024  # kept sockets live at or above this descriptor; libnftables needs those below


def move_high(low: socket.socket, fd_base: int = FD_BASE) -> socket.socket:
    """The same socket at a descriptor >= fd_base (the low one is closed). A soft RLIMIT_NOFILE of fd_base
    or less leaves the socket where it is (no descriptor can reach 1024 then). Raises OSError (EMFILE: no
    high descriptor is free), the low socket closed."""
    timeout = low.gettimeout()
    try:
        high = fcntl.fcntl(low.fileno(), fcntl.F_DUPFD_CLOEXEC, fd_base)
    except OSError as e:
        if e.errno == errno.EINVAL and resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= fd_base:
            return low
        low.close()
        raise
    low.close()
    try:
        sock = socket.socket(fileno=high)
    except OSError:
        os.close(high)
        raise
    sock.settimeout(timeout)
    return sock
