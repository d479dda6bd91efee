"""The state file: atomic, private, and refusing what someone else planted."""

import json
import os
import stat

import pytest

from egressd.desired.statefile import Encoded, StateError, StateFile, encode, ensure_private_dir


def test_round_trip_with_private_modes(tmp_path):
    d = tmp_path / "state"
    sf = StateFile(d)
    assert sf.load() is None
    sf.save({"sandboxes": [{"record": {"id": "a"}}]})
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sf.path).st_mode) == 0o600
    assert sf.load()["sandboxes"] == [{"record": {"id": "a"}}]
    assert [p.name for p in d.iterdir()] == ["state.json"]  # no temporary file left behind


def test_encoded_lists_are_written_from_their_texts_byte_for_byte():
    """The texts are what is written (the items are not encoded again), and the bytes are what json.dumps
    gives for the same document: a state file reads the same whoever wrote it."""
    items = [{"record": {"id": "a", "n": [1, 2]}, "problem": None}, {"record": {"id": "b"}, "problem": "x"}]
    texts = [json.dumps(i, separators=(",", ":")) for i in items]
    for doc in (
        {"sandboxes": Encoded(items, texts), "version": 1},
        {"version": 1, "sandboxes": Encoded(items, texts), "dns": {"n": 1}},
        {"sandboxes": Encoded(items, texts)},
        {"sandboxes": Encoded([], []), "tombstones": []},
    ):
        plain = {k: list(v) if isinstance(v, Encoded) else v for k, v in doc.items()}
        assert encode(doc) == json.dumps(plain, separators=(",", ":")).encode()
    # the texts, not the items: an item changed after it was encoded is not what is written
    stale = Encoded([{"id": "changed"}], ['{"id":"encoded"}'])
    assert json.loads(encode({"sandboxes": stale})) == {"sandboxes": [{"id": "encoded"}]}


def test_export_state_encodes_each_record_once_and_the_file_reads_back(tmp_path):
    from egressd.kernel.fake import FakeBackend
    from egressd.model.config import Config
    from egressd.model.sandbox import parse_sandbox
    from egressd.reconcile.reconciler import Reconciler
    from egressd.reconcile.restart import export_state

    r = Reconciler(FakeBackend(), Config())
    for i in range(3):
        doc = {"id": f"sb-{i}", "netns": f"/run/netns/n{i}", "revision": 1,
               "network_policy": {"allow_out": [f"192.0.2.{i}"]}}  # fmt: skip
        r.upsert(parse_sandbox(doc))
    doc, _ = export_state(r)
    first = [d.record_json for d in r.desired.values()]
    assert doc["sandboxes"].texts == first
    assert [json.loads(t) for t in first] == list(doc["sandboxes"])
    export_state(r)
    assert all(a is b for a, b in zip(first, [d.record_json for d in r.desired.values()], strict=True))
    sf = StateFile(tmp_path / "state")
    sf.save(doc)
    assert sf.load()["sandboxes"] == list(doc["sandboxes"])


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
