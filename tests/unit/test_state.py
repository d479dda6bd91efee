"""The state file: atomic, private, and refusing what someone else planted."""

import json
import os
import stat

import pytest

from egressd.desired.statefile import StateError, StateFile, ensure_private_dir


def test_round_trip_with_private_modes(tmp_path):
    d = tmp_path / "state"
    sf = StateFile(d)
    assert sf.load() is None
    sf.save({"sandboxes": [{"record": {"id": "a"}}]})
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sf.path).st_mode) == 0o600
    assert sf.load()["sandboxes"] == [{"record": {"id": "a"}}]
    assert [p.name for p in d.iterdir()] == ["state.json"]  # no temporary file left behind


def test_a_loose_directory_is_tightened(tmp_path):
    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    ensure_private_dir(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_symlinks_are_refused(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(StateError, match="is a symlink"):
        StateFile(link).save({})
    d = tmp_path / "state"
    d.mkdir()
    target = tmp_path / "elsewhere.json"
    target.write_text(json.dumps({"version": 1}))
    (d / "state.json").symlink_to(target)
    with pytest.raises(StateError, match="symlink"):
        StateFile(d).load()


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"version": 99}', b"[]", b"\xff\xfe"])
def test_corrupt_or_truncated_state_is_reported(tmp_path, content):
    d = tmp_path / "state"
    d.mkdir(mode=0o700)
    (d / "state.json").write_bytes(content)
    with pytest.raises(StateError):
        StateFile(d).load()


def test_a_failed_write_leaves_the_old_file(tmp_path, monkeypatch):
    sf = StateFile(tmp_path / "s")
    sf.save({"n": 1})

    def full(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(OSError, match="No space"):
        sf.save({"n": 2})
    monkeypatch.undo()
    assert sf.load()["n"] == 1
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["state.json"]
