"""glibc malloc tuning (memory.py): it must take effect on glibc and never fail the agent elsewhere."""

from egressd.agent import memory


def test_tune_and_trim_work_on_this_glibc():
    assert memory.tune() is True
    memory.trim()


def test_without_glibc_nothing_breaks():
    assert memory.tune(load=lambda: None) is False
    memory.trim(load=lambda: None)
