"""Desired state on disk, so enforcement survives a SIGKILL or a reboot of the agent.

Written atomically (temporary file, fsync, rename, fsync of the directory): after a crash the file holds
either the old state or the new one, never a torn mix. The directory is the agent's alone (0700), and
neither the directory nor the file may be a symlink planted by someone else.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path
from typing import Any

STATE_FILE = "state.json"
FORMAT_VERSION = 1


class Encoded(list[Any]):
    """A list whose items' JSON texts are already known: save() writes the texts, joined, instead of
    encoding the items again. A sandbox's record is encoded once per change (export_state), not at every
    write: encoding 1,300 records whole took 6-9 ms of each write, holding the interpreter throughout."""

    def __init__(self, items: list[Any], texts: list[str]) -> None:
        super().__init__(items)
        self.texts = texts


def compact(value: Any) -> str:
    """The state file's JSON for one value: an Encoded list's texts must be made by this, so that a write
    joining them gives the bytes json.dumps would."""
    return json.dumps(value, separators=(",", ":"))


def encode(doc: dict[str, Any]) -> bytes:
    """The document as compact JSON, its Encoded lists from their texts: the bytes json.dumps gives when
    the texts are the items' own compact JSON."""
    parts = []
    for key, value in doc.items():
        text = "[" + ",".join(value.texts) + "]" if isinstance(value, Encoded) else compact(value)
        parts.append(json.dumps(key) + ":" + text)
    return ("{" + ",".join(parts) + "}").encode()


class StateError(Exception):
    """The state directory or file cannot be used; the message says what to fix."""


def ensure_private_dir(path: str | Path, mode: int = 0o700) -> Path:
    """Create path (mode 0700) or check the one there: a real directory, not a symlink, owned by us."""
    p = Path(path)
    try:
        p.mkdir(mode=mode, parents=True, exist_ok=True)
    except OSError as e:
        raise StateError(f"{p}: cannot create directory: {e.strerror}") from None
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise StateError(f"{p}: is a symlink; egressd keeps its state only in a real directory")
    if not stat.S_ISDIR(st.st_mode):
        raise StateError(f"{p}: is not a directory")
    if st.st_uid != os.geteuid():
        raise StateError(f"{p}: owned by uid {st.st_uid}, not by egressd (uid {os.geteuid()})")
    if stat.S_IMODE(st.st_mode) & 0o077:
        os.chmod(p, mode)
    return p


class StateFile:
    """One JSON document in a private directory."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / STATE_FILE

    def load(self) -> dict[str, Any] | None:
        """The saved document, None when there is none; StateError when it is corrupt or unsafe."""
        ensure_private_dir(self.dir)
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StateError(f"{self.path}: cannot open ({e.strerror}); is it a symlink?") from None
        with os.fdopen(fd, "rb") as f:
            raw = f.read()
        try:
            doc = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise StateError(
                f"{self.path}: corrupt ({e}); starting empty, the feed will rebuild it"
            ) from None
        if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
            raise StateError(f"{self.path}: not an egressd state file of version {FORMAT_VERSION}")
        return doc

    def save(self, doc: dict[str, Any]) -> None:
        """Replace the file atomically. Raises OSError (e.g. ENOSPC); the old file then stays intact."""
        ensure_private_dir(self.dir)
        data = encode({**doc, "version": FORMAT_VERSION})
        tmp = self.dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            os.unlink(tmp)
            raise
        os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
