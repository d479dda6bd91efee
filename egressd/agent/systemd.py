"""sd_notify(3) without libsystemd: how a Type=notify unit tells systemd it is ready, alive or stopping."""

from __future__ import annotations

import logging
import os
import socket

from egressd.common.logs import log


def sd_notify(message: str) -> bool:
    """Tell systemd (Type=notify) how we are; a no-op when not run by systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log(logging.WARNING, "sd_notify_failed", error=str(e))
        return False
    return True
