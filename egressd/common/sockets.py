"""Listening Unix sockets owned safely: the feed socket and the control socket.

Only a stale socket from an earlier run is ever replaced. Anything else at the path (a file, a directory, a
symlink planted there, or a live agent's socket) is refused with an error that says what to do, and at
shutdown only our own socket (same inode) is removed.
"""

from __future__ import annotations

import logging
import os
import socket
import stat

from egressd.common.logs import log


class SocketPathError(ValueError):
    """The path cannot hold our socket; the message names the path and what to do."""


def _kind_of(mode: int) -> str:
    kinds = [
        (stat.S_ISLNK, "a symlink"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISFIFO, "a FIFO"),
    ]
    return next((name for test, name in kinds if test(mode)), "a device or other special file")


def _someone_listens(path: str) -> bool:
    """Whether a live server owns the socket, so we never steal a running agent's socket."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(path)
        except BlockingIOError:  # backlog full: very much alive
            return True
        except OSError:  # ECONNREFUSED: stale; anything else: no server we could talk to
            return False
        return True


def _clear_stale_socket(path: str) -> None:
    """Remove a socket left by a previous run; refuse (SocketPathError) anything else found at the path."""
    try:
        st = os.lstat(path)  # lstat: a symlink is refused, never followed
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketPathError(
            f"{path} exists and is {_kind_of(st.st_mode)}, not a socket; egressd only replaces"
            " a stale socket and will not remove it: move it away or choose another path"
        )
    if _someone_listens(path):
        raise SocketPathError(
            f"another process is already listening on {path}; stop it or choose another path"
        )
    os.unlink(path)


def bind_unix(path: str, mode: int = 0o600) -> tuple[socket.socket, tuple[int, int]]:
    """A listening socket at `path` with `mode`, and its identity, so that we only ever unlink our own."""
    parent = os.path.dirname(path)
    try:
        if parent:
            os.makedirs(parent, mode=0o700, exist_ok=True)
        _clear_stale_socket(path)
    except OSError as e:
        raise SocketPathError(f"cannot prepare {path}: {e.strerror or e}") from e
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no moment in which others could connect
    try:
        sock.bind(path)
        os.chmod(path, mode)
        st = os.lstat(path)
        sock.listen(socket.SOMAXCONN)
        sock.setblocking(False)
    except OSError as e:
        sock.close()
        raise SocketPathError(f"cannot listen on {path}: {e.strerror or e}") from e
    finally:
        os.umask(old_umask)
    return sock, (st.st_dev, st.st_ino)


def unlink_if_ours(path: str, ident: tuple[int, int]) -> None:
    """Remove our socket at shutdown, but not a socket some later process has put in its place."""
    try:
        st = os.lstat(path)
        if stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == ident:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        log(logging.WARNING, "socket_remove_failed", path=path, error=str(e))
