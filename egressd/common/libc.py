"""The C library the process already has loaded, for the few calls Python does not wrap: setns(2) (os.setns
only exists from Python 3.12), inotify, mallopt and malloc_trim. One handle for the whole agent."""

from __future__ import annotations

import ctypes
import functools


@functools.cache
def libc() -> ctypes.CDLL:
    """The process's own symbols, libc's among them (no search by file name: the library the interpreter
    runs on is the one to call), with errno kept for each call. Raises OSError where there is none."""
    return ctypes.CDLL(None, use_errno=True)
