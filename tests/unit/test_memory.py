"""glibc malloc tuning (memory.py): it must take effect on glibc and never fail the agent elsewhere."""

import gc
import time
import weakref

from egressd.agent import memory
from egressd.common.libc import libc


def test_tune_and_trim_work_on_this_glibc():
    assert memory.tune() is True
    memory.trim()


def test_one_libc_handle_serves_malloc_setns_and_inotify():
    handle = libc()
    assert memory.load_libc() is handle and libc() is handle
    for fn in ("mallopt", "malloc_trim", "setns", "inotify_init1", "inotify_add_watch"):
        assert hasattr(handle, fn), fn


def test_without_glibc_nothing_breaks():
    assert memory.tune(load=lambda: None) is False
    memory.trim(load=lambda: None)


class _Cycle:
    """An object in a reference cycle: only the cyclic collector can free it."""

    def __init__(self) -> None:
        self.me = self


def _clock(now: list[float]):
    return lambda: now[0]


def test_full_collections_wait_during_the_start_and_come_back_after():
    python_default = gc.get_threshold()
    try:
        memory.starting()
        young, middle, full = memory.GC_USUAL
        assert young >= memory.GC_YOUNG and (middle, full) == python_default[1:]
        assert gc.get_threshold() == (python_default[0], middle, full * 100)
        memory.Collector(time.monotonic).settled()
        assert gc.get_threshold() == memory.GC_USUAL
        assert gc.get_freeze_count() > 0  # what the start left is frozen once settled
    finally:
        gc.set_threshold(*python_default)
        gc.unfreeze()


def test_idle_freezes_what_lives_and_collections_no_longer_walk_it():
    """Frozen objects are out of every collection: a cycle dropped after the freeze outlives gc.collect()
    (its control: the same cycle not frozen is collected)."""
    now = [0.0]
    collector = memory.Collector(_clock(now), full_pass_s=600)
    try:
        frozen, loose = _Cycle(), None
        collector.idle()
        loose = _Cycle()
        frozen_ref, loose_ref = weakref.ref(frozen), weakref.ref(loose)
        del frozen, loose
        gc.collect()
        assert frozen_ref() is not None
        assert loose_ref() is None
        assert collector.full_passes == 0
    finally:
        gc.unfreeze()
        gc.collect()


def test_a_full_pass_when_due_collects_frozen_cycles_too():
    now = [0.0]
    collector = memory.Collector(_clock(now), full_pass_s=600)
    try:
        cycle = _Cycle()
        collector.idle()
        ref = weakref.ref(cycle)
        del cycle
        now[0] = 599.0
        collector.idle()  # not due yet: frozen again, not walked
        gc.collect()
        assert ref() is not None and collector.full_passes == 0
        now[0] = 600.0
        collector.idle()
        assert ref() is None
        assert collector.full_passes == 1
        assert gc.get_freeze_count() > 0  # and what lives is frozen again
    finally:
        gc.unfreeze()
        gc.collect()


def test_no_full_pass_while_what_is_frozen_has_not_grown_by_a_quarter():
    """A steady host is not paused for a full pass that would find little: it waits, as Python's own full
    collection does, until the frozen objects grew by a quarter; then it comes at the next due time."""
    now = [0.0]
    collector = memory.Collector(_clock(now), full_pass_s=600)
    try:
        collector.full_pass()
        assert collector.full_passes == 1
        now[0] = 1200.0
        collector.idle()
        assert collector.full_passes == 1  # due by time, but nothing grew
        grown = [[] for _ in range(gc.get_freeze_count() // 4 + 1000)]
        collector.idle()
        assert collector.full_passes == 1  # grown, but looked at 1200: the next look is at 1800
        now[0] = 1800.0
        collector.idle()
        assert collector.full_passes == 2
        del grown
    finally:
        gc.unfreeze()
        gc.collect()


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
