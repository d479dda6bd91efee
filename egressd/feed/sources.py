"""An event source from its spec: file:PATH, stdin, unix:PATH, nats://HOST:PORT or tls://HOST:PORT."""

from __future__ import annotations

import os

from egressd.feed.file import FileSource
from egressd.feed.lines import DEFAULT_MAX_LINE, FeedError, Source
from egressd.feed.stdin import StdinSource
from egressd.feed.unix import UnixSource
from egressd.model.config import NatsFeed
from egressd.model.sandbox import DEFAULT_MAX_ENTRIES

UNIX_PATH_MAX = 107  # sun_path holds 108 bytes including the terminating NUL

# --- specs -------------------------------------------------------------------------------------------------

_FORMS = (
    "file:PATH (follow a file, like tail -F), stdin, unix:PATH (listen on a unix socket), or nats://HOST:PORT"
    " (watch a NATS key-value bucket)"
)


def _path_of(spec: str, kind: str) -> str:
    path = spec[len(kind) + 1 :]
    if not path:
        raise FeedError(f"event source {spec!r} has no path; write {kind}:/path/to/it")
    if "\0" in path:
        raise FeedError(f"event source {spec!r}: the path contains a NUL byte")
    return path


def parse_source(
    spec: str,
    *,
    max_line: int = DEFAULT_MAX_LINE,
    nats: NatsFeed | None = None,
    max_entries: int = DEFAULT_MAX_ENTRIES,
) -> Source:
    """The source a spec names; FeedError names the accepted forms when it names none."""
    if spec.startswith(("nats://", "tls://")):
        from egressd.feed.nats import NatsSource  # a separate module: only fleet hosts load the NATS client

        return NatsSource(spec, nats or NatsFeed(), max_value=max_line, max_entries=max_entries)
    if spec == "stdin":
        return StdinSource(max_line=max_line)
    if spec.startswith("file:"):
        return FileSource(_path_of(spec, "file"), max_line=max_line)
    if spec.startswith("unix:"):
        path = _path_of(spec, "unix")
        size = len(os.fsencode(path))
        if size > UNIX_PATH_MAX:
            raise FeedError(
                f"unix socket path {path!r} is {size} bytes, the kernel allows at most {UNIX_PATH_MAX};"
                " choose a shorter one, such as unix:/run/egressd/feed.sock"
            )
        return UnixSource(path, max_line=max_line)
    hint = f"; for a path, write file:{spec} or unix:{spec}" if spec.startswith(("/", ".")) else ""
    raise FeedError(f"unknown event source {spec!r}: write {_FORMS}{hint}")
