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


def test_tune_pins_both_thresholds() -> None:
    """The trim threshold and the mmap threshold: a big block the worker threads free is unmapped, not kept
    in their heaps (bench.dns: 133 MiB against 153 with the mmap threshold left to float)."""
    calls: list[tuple[int, int]] = []

    class Libc:
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 1

    assert memory.tune(load=Libc) is True
    assert calls == [
        (memory.M_TRIM_THRESHOLD, memory.TRIM_THRESHOLD),
        (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD),
    ]
    # A libc that refuses a setting is reported, not ignored.
    calls.clear()

    class Refusing(Libc):
        def mallopt(self, param: int, value: int) -> int:
            calls.append((param, value))
            return 0 if param == memory.M_MMAP_THRESHOLD else 1

    assert memory.tune(load=Refusing) is False
    assert len(calls) == 2
