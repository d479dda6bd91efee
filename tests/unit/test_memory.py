"""glibc malloc tuning (memory.py): it must take effect on glibc and never fail the agent elsewhere."""

from egressd.agent import memory


def test_tune_and_trim_work_on_this_glibc():
    assert memory.tune() is True
    memory.trim()


def test_without_glibc_nothing_breaks(monkeypatch):
    monkeypatch.setattr(memory, "_libc", lambda: None)
    assert memory.tune() is False
    memory.trim()
