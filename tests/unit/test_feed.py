"""The event feed with real files, pipes and unix sockets; no root needed. Every test is bounded in time."""

import asyncio
import contextlib
import functools
import os
import socket
import stat
import tempfile

import pytest

from egressd.feed.dirwatch import DirWatch
from egressd.feed.file import TRUNCATED_DROPPED, FileSource
from egressd.feed.lines import PARTIAL_DROPPED, FeedError, Line, LineSplitter
from egressd.feed.sources import parse_source
from egressd.feed.stdin import StdinSource
from egressd.feed.unix import UnixSource

POLL = 0.01


def bounded(fn):
    """Run an async test on its own loop, failing it if it takes more than a few seconds."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 5))

    return wrapper


async def until(cond, timeout=3.0):
    async def poll():
        while not cond():
            await asyncio.sleep(0.005)

    await asyncio.wait_for(poll(), timeout)


@contextlib.asynccontextmanager
async def running(source):
    """Run a source as a task; yield what it delivered so far; on exit cancel it and surface any crash."""
    lines: list[Line] = []
    task = asyncio.create_task(source.run(lines.append))
    try:
        yield lines
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 2)


def texts(lines):
    return [(x.lineno, x.text) for x in lines]


@pytest.fixture
def sock_path(tmp_path):
    """A socket path short enough for sun_path even when tmp_path is deep."""
    path = tmp_path / "f.sock"
    if len(str(path)) < 100:
        return path
    short = tempfile.mkdtemp(prefix="egf")  # only on hosts with a long TMPDIR
    return type(tmp_path)(short) / "f.sock"


# --- parse_source ------------------------------------------------------------------------------------------


def test_parse_source_accepts_the_three_forms(tmp_path):
    f = parse_source(f"file:{tmp_path}/events.ndjson")
    assert isinstance(f, FileSource) and f.name == f"file:{tmp_path}/events.ndjson"
    s = parse_source("stdin")
    assert isinstance(s, StdinSource) and s.name == "stdin"
    u = parse_source("unix:/run/egressd/feed.sock", max_line=1000)
    assert isinstance(u, UnixSource) and u.name == "unix:/run/egressd/feed.sock" and u.max_line == 1000


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "write file:PATH (follow a file, like tail -F), stdin, unix:PATH"),
        ("", "or nats://HOST:PORT (watch a NATS key-value bucket)"),
        ("nats://127.0.0.1", "no port; write nats://127.0.0.1:4222"),
        ("nats://u:secret@127.0.0.1:4222", "credentials in the URL would show in status and logs"),
        ("nats://127.0.0.1:4222/bucket", "the bucket is [feed.nats] bucket"),
        ("nats://127.0.0.1:99999", "Port out of range"),
        ("nats://127.0.0.1:4222,http://x:1", "write nats://HOST:PORT or tls://HOST:PORT"),
        ("tcp:127.0.0.1:9000", "unknown event source 'tcp:127.0.0.1:9000'"),
        ("STDIN", "unknown event source 'STDIN'"),
        ("/var/lib/egressd/events.ndjson", "write file:/var/lib/egressd/events.ndjson or unix:/var/lib"),
        ("file:", "has no path; write file:/path/to/it"),
        ("unix:", "has no path; write unix:/path/to/it"),
        ("unix:/" + "x" * 120, "the kernel allows at most 107"),
    ],
)
def test_parse_source_errors_say_what_to_write(spec, expected):
    with pytest.raises(FeedError) as e:
        parse_source(spec)
    assert expected in str(e.value)


# --- LineSplitter ------------------------------------------------------------------------------------------


def test_splitter_numbers_lines_strips_crlf_and_skips_blank_lines():
    s = LineSplitter("t")
    out = s.feed(b'{"a":1}\r\n\n   \t\n{"b"') + s.feed(b":2}\n")
    assert texts(out) == [(1, '{"a":1}'), (4, '{"b":2}')]
    assert s.finish() is None


def test_splitter_refuses_invalid_utf8_and_goes_on():
    s = LineSplitter("t")
    out = s.feed(b'\xff\xfe{"a":1}\n{"ok":"\xc3\xa9"}\n')
    assert out[0].text is None and out[0].lineno == 1 and "not valid UTF-8" in out[0].error
    assert texts(out[1:]) == [(2, '{"ok":"é"}')]


def test_splitter_limit_is_exact():
    s = LineSplitter("t", max_line=10)
    out = s.feed(b"x" * 10 + b"\n" + b"y" * 11 + b"\n")
    assert texts(out) == [(1, "x" * 10), (2, None)]
    assert out[1].error == "line 2 longer than 10 bytes; skipped"


def test_splitter_memory_stays_bounded_for_a_line_that_never_ends():
    s = LineSplitter("t", max_line=1000)
    for _ in range(5):  # accumulates up to the limit, then skips
        assert s.feed(b"z" * 300) == []
    assert s.max_buffered == 900 and s.buffered == 0
    for _ in range(2500):  # 10 MB in 4 KiB pieces
        assert s.feed(b"z" * 4096) == []
        assert s.buffered <= 1000
    out = s.feed(b'\n{"next":1}\n')
    assert [(x.lineno, x.text, x.error) for x in out] == [
        (1, None, "line 1 longer than 1000 bytes; skipped"),
        (2, '{"next":1}', None),
    ]
    assert s.max_buffered == 900


def test_splitter_finish_emits_or_refuses_the_partial_line():
    s = LineSplitter("t")
    s.feed(b'a\n{"x":1}')
    assert s.finish() == Line("t", 2, '{"x":1}')
    s.feed(b"b\n{partial")
    assert s.finish(PARTIAL_DROPPED) == Line("t", 4, None, PARTIAL_DROPPED)
    s.reset()
    assert texts(s.feed(b"c\n")) == [(1, "c")]


# --- file:PATH ---------------------------------------------------------------------------------------------


@bounded
async def test_file_reads_from_the_start_with_line_numbers(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"n":1}\n\n{"n":2}\r\n{"n":3}\n')
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: len(lines) == 3)
        assert texts(lines) == [(1, '{"n":1}'), (3, '{"n":2}'), (4, '{"n":3}')]
        assert {x.source for x in lines} == {f"file:{f}"}
        h = src.health()
        assert h["lines"] == 3 and h["rejected"] == 0 and h["connected"] == 1 and h["source"] == f"file:{f}"


@bounded
async def test_file_follows_appends_and_waits_for_the_rest_of_a_line(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"n":1}\n')
    async with running(FileSource(f, poll_interval=POLL)) as lines:
        await until(lambda: len(lines) == 1)
        with f.open("ab") as w:
            w.write(b'{"n":2}\n{"n":')
            w.flush()
            await until(lambda: len(lines) == 2)
            await asyncio.sleep(5 * POLL)
            assert len(lines) == 2  # the writer is mid-line: nothing yet
            w.write(b"3}\n")
            w.flush()
            await until(lambda: len(lines) == 3)
        assert texts(lines) == [(1, '{"n":1}'), (2, '{"n":2}'), (3, '{"n":3}')]


async def _appended_seen_within(src: FileSource, f, seconds: float) -> bool:
    """Whether a line appended to f after the first is read within `seconds`."""
    async with running(src) as lines:
        await until(lambda: len(lines) == 1)
        with f.open("ab") as w:
            w.write(b'{"n":2}\n')
        with contextlib.suppress(TimeoutError):
            await until(lambda: len(lines) == 2, timeout=seconds)
        return len(lines) == 2


@bounded
async def test_file_sees_an_append_at_once_not_at_the_next_poll(tmp_path):
    """inotify on the directory wakes the reader: an append is read long before a 30 s poll would come.
    The control, the poll alone, has not read it by then."""
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"n":1}\n')
    assert await _appended_seen_within(FileSource(f, poll_interval=30), f, 1.0)
    f.write_bytes(b'{"n":1}\n')
    assert not await _appended_seen_within(FileSource(f, poll_interval=30, inotify=False), f, 0.5)


@bounded
async def test_file_through_a_symlink_and_across_rotation_is_seen_at_once(tmp_path):
    """The target's directory is watched too, and a rotation (a new file under the path) wakes the reader."""
    real_dir, link_dir = tmp_path / "real", tmp_path / "link"
    real_dir.mkdir()
    link_dir.mkdir()
    target = real_dir / "events.ndjson"
    target.write_bytes(b'{"n":1}\n')
    link = link_dir / "events.ndjson"
    link.symlink_to(target)
    assert await _appended_seen_within(FileSource(link, poll_interval=30), target, 1.0)
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"n":1}\n')
    async with running(FileSource(f, poll_interval=30)) as lines:
        await until(lambda: len(lines) == 1)
        os.rename(f, tmp_path / "events.ndjson.1")
        f.write_bytes(b'{"new":1}\n')
        await until(lambda: len(lines) == 2, timeout=1.0)
        assert texts(lines)[-1] == (1, '{"new":1}')


@bounded
async def test_a_symlink_pointed_at_another_directory_is_watched_there(tmp_path):
    """The link re-pointed (a new link renamed over it) to a file elsewhere: once that file is opened, its
    directory is watched, so an append there is seen at once, not at the next poll."""
    old_dir, new_dir, link_dir = tmp_path / "old", tmp_path / "new", tmp_path / "link"
    for d in (old_dir, new_dir, link_dir):
        d.mkdir()
    (old_dir / "a.ndjson").write_bytes(b'{"n":1}\n')
    (new_dir / "b.ndjson").write_bytes(b'{"n":2}\n')
    link = link_dir / "events.ndjson"
    link.symlink_to(old_dir / "a.ndjson")
    async with running(FileSource(link, poll_interval=30)) as lines:
        await until(lambda: len(lines) == 1)
        (link_dir / "next").symlink_to(new_dir / "b.ndjson")
        os.rename(link_dir / "next", link)  # the link's directory is watched: this wakes the reader
        await until(lambda: len(lines) == 2, timeout=1.0)
        await asyncio.sleep(0.05)  # the reader is waiting again, on its new watch (or on the 30 s poll)
        with open(new_dir / "b.ndjson", "ab") as f:
            f.write(b'{"n":3}\n')
        await until(lambda: len(lines) == 3, timeout=1.0)
        assert [t for _, t in texts(lines)] == ['{"n":1}', '{"n":2}', '{"n":3}']


def test_dirwatch_says_why_it_cannot_watch(tmp_path):
    class NoInotify:
        pass

    assert DirWatch.open([str(tmp_path)], libc=NoInotify()) == (None, "no inotify in this libc")
    watch, why = DirWatch.open([str(tmp_path / "missing")])
    assert watch is None and why.startswith(f"cannot watch {tmp_path / 'missing'}: ")
    watch, why = DirWatch.open([str(tmp_path)], ["events.ndjson"])
    assert watch is not None and why == ""
    try:
        assert not watch.drain()  # nothing happened yet
        (tmp_path / "agent.log").write_bytes(b"1")  # another file in the directory wakes nobody
        assert not watch.drain()
        (tmp_path / "events.ndjson").write_bytes(b"1")
        assert watch.drain() and not watch.drain()
    finally:
        watch.close()


@bounded
async def test_file_truncation_restarts_line_numbers(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"n":1}\n{"n":2}\n{"n":3}\n{"partial"')
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: len(lines) == 3)
        f.write_bytes(b'{"new":1}\n')  # shorter than what was read: truncated
        await until(lambda: len(lines) == 5)
        assert lines[3] == Line(f"file:{f}", 4, None, TRUNCATED_DROPPED)
        assert lines[4] == Line(f"file:{f}", 1, '{"new":1}')
        h = src.health()
        assert h["truncations"] == 1 and "truncated" in h["last_note"]


@bounded
async def test_file_rotation_finishes_the_old_file_first(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"old":1}\n')
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: len(lines) == 1)
        with f.open("ab") as w:  # the writer appends, then rotation, then the writer is done with it
            w.write(b'{"old":2}\n{"old":3}\n{"old-incomplete"')
            f.rename(tmp_path / "events.ndjson.1")
            f.write_bytes(b'{"new":1}\n{"new":2}\n')
        await until(lambda: len(lines) == 6)
        assert texts(lines) == [
            (1, '{"old":1}'),
            (2, '{"old":2}'),
            (3, '{"old":3}'),
            (4, '{"old-incomplete"'),  # emitted as a line; the daemon will find it is not JSON
            (1, '{"new":1}'),
            (2, '{"new":2}'),
        ]
        assert src.health()["rotations"] == 1
        with f.open("ab") as w:
            w.write(b'{"new":3}\n')
        await until(lambda: len(lines) == 7)
        assert lines[-1].lineno == 3


@bounded
async def test_file_removed_then_recreated(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"a":1}\n')
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: len(lines) == 1)
        f.unlink()
        await until(lambda: "removed" in (src.health()["last_note"] or ""))
        await asyncio.sleep(3 * POLL)
        f.write_bytes(b'{"b":1}\n')
        await until(lambda: len(lines) == 2)
        assert lines[1] == Line(f"file:{f}", 1, '{"b":1}')


@bounded
async def test_file_missing_at_start_is_waited_for(tmp_path):
    f = tmp_path / "later" / "events.ndjson"
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: src.health()["last_note"] == f"waiting for {f} to appear")
        assert src.health()["waiting"] is True and src.health()["connected"] == 0
        await asyncio.sleep(3 * POLL)
        f.parent.mkdir()
        f.write_bytes(b'{"a":1}\n')
        await until(lambda: len(lines) == 1)
        assert lines[0] == Line(f"file:{f}", 1, '{"a":1}')


@bounded
async def test_file_that_is_a_directory_is_reported_not_fatal(tmp_path):
    f = tmp_path / "events.ndjson"
    f.mkdir()
    src = FileSource(f, poll_interval=POLL)
    async with running(src) as lines:
        await until(lambda: "not a regular file" in (src.health()["last_error"] or ""))
        f.rmdir()
        f.write_bytes(b"{}\n")
        await until(lambda: len(lines) == 1)


@bounded
async def test_file_oversize_line_is_refused_with_bounded_memory(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"before":1}\n')
    src = FileSource(f, poll_interval=POLL, max_line=1000)
    async with running(src) as lines:
        await until(lambda: len(lines) == 1)
        with f.open("ab") as w:
            for _ in range(10):  # 10 MB, written while the feed reads
                w.write(b"x" * 1_000_000)
                w.flush()
                await asyncio.sleep(0.005)
            w.write(b'\n{"after":1}\n')
        await until(lambda: len(lines) == 3)
    assert texts(lines) == [(1, '{"before":1}'), (2, None), (3, '{"after":1}')]
    assert lines[1].error == "line 2 longer than 1000 bytes; skipped"
    h = src.health()
    assert h["rejected"] == 1 and h["lines"] == 2
    assert h["max_buffered"] <= 1000 + 64 * 1024
    assert h["last_error"] == f"file:{f}:2: line 2 longer than 1000 bytes; skipped"


@bounded
async def test_file_invalid_utf8_is_refused(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b'{"a":"\xff"}\n{"b":1}\n')
    async with running(FileSource(f, poll_interval=POLL)) as lines:
        await until(lambda: len(lines) == 2)
    assert lines[0].text is None and lines[0].lineno == 1 and "not valid UTF-8" in lines[0].error
    assert lines[1] == Line(f"file:{f}", 2, '{"b":1}')


@pytest.mark.swallows_bugs
@bounded
async def test_a_raising_handler_does_not_stop_the_feed(tmp_path):
    f = tmp_path / "events.ndjson"
    f.write_bytes(b"1\n2\n3\n")
    seen = []

    def handler(line):
        seen.append(line.text)
        if line.text == "2":
            raise RuntimeError("daemon bug")

    src = FileSource(f, poll_interval=POLL)
    task = asyncio.create_task(src.run(handler))
    await until(lambda: len(seen) == 3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["1", "2", "3"] and src.health()["callback_errors"] == 1
    assert src.health()["connected"] == 0  # the file was closed on cancellation


# --- stdin -------------------------------------------------------------------------------------------------


@bounded
async def test_stdin_pipe_until_eof(tmp_path):
    r, w = os.pipe()
    try:
        src = StdinSource(stream=r)
        lines: list[Line] = []
        task = asyncio.create_task(src.run(lines.append))
        os.write(w, b'{"a":1}\n\n{"b"')
        await until(lambda: len(lines) == 1)
        assert src.health()["connected"] == 1 and src.health()["ended"] is False
        os.write(w, b':2}\n{"last-without-newline":1}')
        os.close(w)
        w = None
        await asyncio.wait_for(task, 3)  # returns normally at EOF
    finally:
        if w is not None:
            os.close(w)
        os.close(r)
    assert texts(lines) == [(1, '{"a":1}'), (3, '{"b":2}'), (4, '{"last-without-newline":1}')]
    assert all(x.source == "stdin" for x in lines)
    h = src.health()
    assert h["ended"] is True and h["connected"] == 0 and h["lines"] == 3


@bounded
async def test_stdin_from_a_file_and_from_dev_null(tmp_path):
    f = tmp_path / "in.ndjson"
    f.write_bytes(b'{"a":1}\n' * 3)
    with f.open("rb") as stream:
        lines: list[Line] = []
        await asyncio.wait_for(StdinSource(stream=stream).run(lines.append), 3)
    assert [x.lineno for x in lines] == [1, 2, 3]
    with open(os.devnull, "rb") as null:
        src = StdinSource(stream=null)
        await asyncio.wait_for(src.run(lines.append), 3)
    assert src.health()["ended"] is True and src.health()["lines"] == 0


@bounded
async def test_stdin_oversize_line(tmp_path):
    r, w = os.pipe()
    src = StdinSource(max_line=1000, stream=r)
    lines: list[Line] = []
    task = asyncio.create_task(src.run(lines.append))
    try:
        for _ in range(40):
            await asyncio.to_thread(os.write, w, b"y" * 65536)
        await asyncio.to_thread(os.write, w, b'\n{"ok":1}\n')
    finally:
        os.close(w)
    await asyncio.wait_for(task, 3)
    os.close(r)
    assert texts(lines) == [(1, None), (2, '{"ok":1}')]
    assert src.health()["max_buffered"] <= 1000


@bounded
async def test_stdin_cancel_while_waiting_for_input():
    r, w = os.pipe()
    src = StdinSource(stream=r)
    task = asyncio.create_task(src.run(lambda line: None))
    await until(lambda: src.health()["connected"] == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 1)
    assert src.health()["connected"] == 0 and src.health()["ended"] is False
    os.close(w)  # the reader thread sees EOF and exits; only then is it safe to close its descriptor
    await asyncio.sleep(0.05)
    os.close(r)


# --- unix:PATH ---------------------------------------------------------------------------------------------


async def connect(path):
    return await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 2)


@bounded
async def test_unix_two_producers_each_with_their_own_line_numbers(sock_path):
    src = UnixSource(sock_path)
    async with running(src) as lines:
        await until(lambda: sock_path.exists())
        _, w1 = await connect(sock_path)
        await until(lambda: src.health()["connections"] == 1)
        _, w2 = await connect(sock_path)
        await until(lambda: src.health()["connected"] == 2)
        w1.write(b'{"p":1,"n":1}\n{"p":1,')
        await w1.drain()
        w2.write(b'{"p":2,"n":1}\n')
        await w2.drain()
        await until(lambda: len(lines) == 2)
        w1.write(b'"n":2}\n')
        w2.write(b'\n{"p":2,"n":3}\n')
        await w1.drain()
        await w2.drain()
        await until(lambda: len(lines) == 4)
        for w in (w1, w2):
            w.close()
            await w.wait_closed()
        await until(lambda: src.health()["connected"] == 0)
    by_source = {}
    for x in lines:
        by_source.setdefault(x.source, []).append((x.lineno, x.text))
    assert by_source == {
        f"unix:{sock_path}#1": [(1, '{"p":1,"n":1}'), (2, '{"p":1,"n":2}')],
        f"unix:{sock_path}#2": [(1, '{"p":2,"n":1}'), (3, '{"p":2,"n":3}')],
    }
    assert src.health()["connections"] == 2 and src.health()["lines"] == 4


@bounded
async def test_unix_disconnect_mid_line_is_reported(sock_path):
    src = UnixSource(sock_path)
    async with running(src) as lines:
        await until(lambda: sock_path.exists())
        _, w = await connect(sock_path)
        w.write(b'{"a":1}\n{"cut')
        await w.drain()
        w.close()
        await w.wait_closed()
        await until(lambda: len(lines) == 2)
    src_name = f"unix:{sock_path}#1"
    assert lines == [Line(src_name, 1, '{"a":1}'), Line(src_name, 2, None, PARTIAL_DROPPED)]
    assert src.health()["rejected"] == 1


@bounded
async def test_unix_oversize_line_does_not_grow_memory(sock_path):
    src = UnixSource(sock_path, max_line=1000)
    async with running(src) as lines:
        await until(lambda: sock_path.exists())
        _, w = await connect(sock_path)
        for _ in range(10):
            w.write(b"q" * 1_000_000)
            await w.drain()
        w.write(b'\n{"after":1}\n')
        await w.drain()
        await until(lambda: len(lines) == 2)
        w.close()
    assert texts(lines) == [(1, None), (2, '{"after":1}')]
    assert src.health()["max_buffered"] <= 1000


@bounded
async def test_unix_socket_mode_parent_dir_and_cleanup(tmp_path):
    path = tmp_path / "run" / "f.sock"
    src = UnixSource(path)
    async with running(src):
        await until(lambda: path.exists())
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
        assert src.health()["listening"] is True
    assert not path.exists()  # removed at shutdown


@bounded
async def test_unix_custom_mode(sock_path):
    async with running(UnixSource(sock_path, mode=0o660)):
        await until(lambda: sock_path.exists())
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == 0o660


@bounded
async def test_unix_stale_socket_is_replaced(sock_path):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays: a socket nobody listens on
    src = UnixSource(sock_path)
    async with running(src) as lines:
        await until(lambda: src.health()["listening"])
        _, w = await connect(sock_path)
        w.write(b"{}\n")
        await w.drain()
        await until(lambda: len(lines) == 1)
        w.close()


@bounded
async def test_unix_live_socket_of_another_process_is_not_stolen(sock_path):
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(sock_path))
    live.listen(1)
    try:
        with pytest.raises(FeedError, match="another process is already listening"):
            await UnixSource(sock_path).run(lambda line: None)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        live.close()


@bounded
async def test_unix_refuses_a_regular_file_and_keeps_it(sock_path):
    sock_path.write_text("precious")
    with pytest.raises(FeedError) as e:
        await UnixSource(sock_path).run(lambda line: None)
    assert f"{sock_path} exists and is a regular file, not a socket" in str(e.value)
    assert "will not remove it" in str(e.value)
    assert sock_path.read_text() == "precious"


@bounded
async def test_unix_refuses_a_symlink_even_to_a_socket(tmp_path, sock_path):
    target = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    target.bind(str(tmp_path / "real.sock"))
    target.close()
    link = sock_path.parent / "link.sock"
    link.symlink_to(tmp_path / "real.sock")
    with pytest.raises(FeedError, match="is a symlink, not a socket"):
        await UnixSource(link).run(lambda line: None)
    assert link.is_symlink() and (tmp_path / "real.sock").exists()


@bounded
async def test_unix_does_not_unlink_a_socket_that_replaced_ours(sock_path):
    async with running(UnixSource(sock_path)):
        await until(lambda: sock_path.exists())
        sock_path.unlink()
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.bind(str(sock_path))
    try:
        assert sock_path.exists()
    finally:
        other.close()


@bounded
async def test_unix_cancel_closes_open_connections(sock_path):
    src = UnixSource(sock_path)
    async with running(src):
        await until(lambda: sock_path.exists())
        reader, w = await connect(sock_path)
        w.write(b'{"half')
        await w.drain()
        await until(lambda: src.health()["connected"] == 1)
    assert await asyncio.wait_for(reader.read(), 2) == b""  # our end was closed
    assert src.health()["connected"] == 0
    w.close()
