"""bench.profile's aggregation of py-spy's raw stacks, on hand-written lines: no root, no py-spy."""

from __future__ import annotations

import pytest

from bench.profile import parse_args, parse_raw, short_frame, summarize

RAW = """\
thread (100): MainThread;main (egressd/cli.py:10);load (egressd/state.py:5) 5
thread (100);main (egressd/cli.py:10);load (egressd/state.py:5) 2
thread (101): egressd-apply_0;run (/usr/lib/python3.11/threading.py:975);_cmd (/work/main/egressd/nft.py:216) 7
thread (101): egressd-apply_0;run (/usr/lib/python3.11/threading.py:975);wait (/usr/lib/python3/dist-packages/x.py:3) 1
thread (102): egressd-apply_1;f (a.py:1);f (a.py:1);g (a.py:2) 3
"""


def test_counts_per_thread_merge_named_and_unnamed_lines_of_one_thread() -> None:
    s = parse_raw(RAW)
    assert s.total == 18
    assert s.threads == {
        "thread 100: MainThread": 7,
        "thread 101: egressd-apply_0": 8,
        "thread 102: egressd-apply_1": 3,
    }


def test_self_is_the_innermost_frame_and_inclusive_counts_recursion_once() -> None:
    s = parse_raw(RAW)
    assert s.self_frames["load (egressd/state.py:5)"] == 7
    assert s.self_frames["_cmd (egressd/nft.py:216)"] == 7
    assert s.self_frames["g (a.py:2)"] == 3
    assert s.inclusive["f (a.py:1)"] == 3  # twice on the stack, once per sample
    assert s.inclusive["main (egressd/cli.py:10)"] == 7
    assert s.inclusive["run (python3.11/threading.py:975)"] == 8


def test_paths_shortened_to_the_package() -> None:
    assert short_frame("_cmd (/work/main/egressd/nft.py:216)") == "_cmd (egressd/nft.py:216)"
    assert short_frame("w (/usr/lib/python3/dist-packages/x.py:3)") == "w (dist-packages/x.py:3)"
    assert short_frame("<module> (<frozen runpy>:88)") == "<module> (<frozen runpy>:88)"


def test_summary_lists_threads_then_top_k_self_and_inclusive() -> None:
    text = summarize(RAW, top=2)
    lines = text.splitlines()
    assert lines[0] == "total samples 18"
    self_at = lines.index("--- top 2 frames by self samples")
    incl_at = lines.index("--- top 2 frames by inclusive samples")
    assert lines[1] == "--- samples per thread"
    assert lines[2].split() == ["8", "44.4%", "thread", "101:", "egressd-apply_0"]
    assert self_at == 5 and incl_at == self_at + 3 and len(lines) == incl_at + 3
    assert {lines[self_at + 1].split()[0], lines[self_at + 2].split()[0]} == {"7"}
    assert lines[incl_at + 1].split()[:2] == ["8", "44.4%"]


def test_threads_beyond_top_k_are_one_line() -> None:
    lines = summarize(RAW, top=1).splitlines()
    assert lines[1:4] == [
        "--- samples per thread",
        "      8  44.4%  thread 101: egressd-apply_0",
        "     10  55.6%  (2 other threads)",
    ]


def test_unreadable_lines_are_skipped_and_said() -> None:
    text = summarize("garbage\n\nthread (1): T;f (a.py:1) 2\n", top=5)
    assert text.splitlines()[0] == "total samples 2 (1 unreadable lines skipped)"
    assert summarize("", top=5).splitlines()[0] == "total samples 0"


def test_config_lines_must_be_key_value() -> None:
    assert parse_args(["--config-line", "cached_contexts = 8"]).config_line == ["cached_contexts = 8"]
    with pytest.raises(SystemExit):
        parse_args(["--config-line", "cached_contexts"])
