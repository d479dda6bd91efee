"""glibc malloc tuning (memory.py): it must take effect on glibc and never fail the agent elsewhere."""

from egressd.agent import memory


def test_tune_and_trim_work_on_this_glibc():
    assert memory.tune() is True
    memory.trim()


def test_without_glibc_nothing_breaks():
    assert memory.tune(load=lambda: None) is False
    memory.trim(load=lambda: None)


def test_full_collections_wait_during_the_start_and_come_back_after():
    import gc

    usual = gc.get_threshold()
    try:
        memory.starting()
        assert gc.get_threshold() == (usual[0], usual[1], usual[2] * 100)
        memory.settled()
        assert gc.get_threshold() == usual
    finally:
        gc.set_threshold(*usual)
