"""Told at once when a file in a directory changes: inotify(7) through libc, for `file:` feeds.

A followed file is polled every 0.1 s as well; this only makes an append seen within a millisecond instead
of 50 ms on average (a burst of upserts appended to the feed waited for the next poll before any of it was
read). A watch on the directory hears appends to the files in it (IN_MODIFY), and their creation, renaming
and deletion, so one watch follows a file across rotation. Where inotify cannot watch (no such call, no
watches left: fs.inotify.max_user_watches; DirWatch.open returns None and says why), or the file is on a
filesystem that never reports (NFS), the polling alone goes on as before.
"""

from __future__ import annotations

import ctypes
import os
import struct
from collections.abc import Iterable
from typing import Any

from egressd.common.libc import libc as process_libc

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# What a followed file can go through: appended to, truncated (IN_MODIFY), replaced or removed.
MASK = (
    IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR
)  # fmt: skip
IN_Q_OVERFLOW = 0x4000
READ_SIZE = 64 * 1024
EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len (of the name that follows)


class DirWatch:
    """One inotify descriptor watching some directories for what happens to files of some names (other
    files there, such as a log the agent itself writes next to its feed, wake nobody)."""

    def __init__(self, fd: int, names: Iterable[str] = ()) -> None:
        self.fd = fd
        self.names = frozenset(os.fsencode(n) for n in names)

    @classmethod
    def open(
        cls, dirs: Iterable[str], names: Iterable[str] = (), libc: Any = None
    ) -> tuple[DirWatch | None, str]:
        """Watches on every directory, for the files named `names` in them, or (None, why not)."""
        if libc is None:
            libc = process_libc()
        if not hasattr(libc, "inotify_init1"):
            return None, "no inotify in this libc"
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return None, f"inotify_init1: {os.strerror(ctypes.get_errno())}"
        for d in dict.fromkeys(dirs):
            if libc.inotify_add_watch(fd, os.fsencode(d), MASK) < 0:
                err = os.strerror(ctypes.get_errno())
                os.close(fd)
                return None, f"cannot watch {d}: {err}"
        return cls(fd, names), ""

    def drain(self) -> bool:
        """Read every pending event; True when one concerns a watched name, a directory itself, or events
        were lost (the queue overflowed): then the file must be looked at again."""
        seen = False
        while True:
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return seen
            if not data:
                return seen
            seen = self._concerns(data) or seen

    def _concerns(self, data: bytes) -> bool:
        """Whether a read's events (struct inotify_event, each followed by its NUL-padded name) name a
        watched file, or none at all."""
        offset = 0
        while offset + EVENT.size <= len(data):
            _, mask, _, length = EVENT.unpack_from(data, offset)
            name = data[offset + EVENT.size : offset + EVENT.size + length].rstrip(b"\0")
            offset += EVENT.size + length
            if mask & IN_Q_OVERFLOW or not name or name in self.names:
                return True
        return False

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
