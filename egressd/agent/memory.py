"""glibc malloc settings for a long-running agent whose allocations are mostly short-lived.

The worker threads read and write tables (raw netlink buffers, and libnftables for what still goes through
it), allocating and freeing blocks of hundreds of kilobytes. glibc keeps what is freed for reuse and returns
it to the kernel only from the top of a heap, by default once 128 KiB or more are free there; and by
default a freed mmap-ed block raises the size under which blocks come from the heaps instead (up to 32
MiB), so the threads' heaps fill with big blocks they keep. Both thresholds are pinned here (a block of 128
KiB or more is its own mapping, unmapped when freed), and trim() hands back free memory from anywhere in
the heaps after the start's burst, and at every resync. Measured with 1,000 sandboxes and 10,100 host
names (bench.dns): 133 MiB resident against 153 MiB with the mmap threshold left to float (the threads'
heaps 12 MiB instead of 28-34). Pinning it slowed cold starts by a quarter when every write was a
libnftables call (a fresh mapping, zeroed pages, per call); the writes are raw netlink now.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from typing import Any

from egressd.common.libc import libc
from egressd.common.logs import log

M_TRIM_THRESHOLD = -1
TRIM_THRESHOLD = 128 * 1024
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
# Python's cyclic collector: during the start every record, policy and table made lives on, and each full
# collection walks all of them again (measured: 1,000 sandboxes enforced 0.5 s sooner without them). Until
# the start is over a full collection waits for 100 times more young collections than usual.
# Once started, a young collection waits for 5,000 new objects, not 700: a new sandbox makes a few hundred
# that live on, each walked again by every young collection until it is frozen (see Collector). In a burst
# of 300 onto 1,000 the young collections took 63-128 ms at 700, 30-35 ms at 5,000 (a pause of a few ms
# each). Not during the start: there the cold start of 1,000 took 4.8 s at 5,000 against 3.7 s at 700.
GC_YOUNG = 5000
GC_DEFAULT = gc.get_threshold()
GC_USUAL = (max(GC_YOUNG, GC_DEFAULT[0]), *GC_DEFAULT[1:])
GC_STARTING = (GC_DEFAULT[0], GC_DEFAULT[1], GC_DEFAULT[2] * 100)
FULL_PASS_S = 600.0  # full passes at most this often (see Collector)


def load_libc() -> Any | None:
    try:
        return libc()
    except OSError:
        return None


def tune(load: Callable[[], Any | None] = load_libc) -> bool:
    """Set the thresholds; False (and a log line) where libc has no mallopt (not glibc)."""
    libc = load()
    if libc is None or not hasattr(libc, "mallopt"):
        log(logging.INFO, "malloc_not_tuned", detail="not glibc: memory settles at its high-water mark")
        return False
    trim_set = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return bool(trim_set and libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)


def starting() -> None:
    gc.set_threshold(*GC_STARTING)


class Collector:
    """Python's cyclic collector for an agent whose objects, once made, mostly live as long as their
    sandbox (records, policies, held tables, sockets). Every young collection walks again what survived the
    last ones, and a full one walks everything: in a burst of 300 new sandboxes onto 1,000 the collector
    took 70-250 ms of the 1.1-1.3 s (bench.onboard), all of it holding the GIL. So what lives when the
    reconciler runs out of work is frozen (gc.freeze: moved where no collection walks it, in constant
    time), and the next burst's collections walk only what came after. A frozen object freed by reference
    counting is freed at once; only a frozen cycle waits: at most every FULL_PASS_S a full pass unfreezes,
    collects and freezes again (about 0.15 ms of GIL per sandbox held, on the event loop), when what is
    frozen grew by a quarter since the last one: Python's own rule for a full collection, so cycles wait no
    longer than they would without the freeze, and a steady host of 10,000 sandboxes is not paused for it."""

    def __init__(self, clock: Callable[[], float], full_pass_s: float = FULL_PASS_S) -> None:
        self._clock = clock
        self._full_pass_s = full_pass_s
        self._last_full = clock()
        self._frozen_after = gc.get_freeze_count()  # frozen right after the last full pass
        self.full_passes = 0

    def settled(self) -> None:
        """The start is over: the usual thresholds, and what the start left collected once and frozen."""
        gc.set_threshold(*GC_USUAL)
        self.full_pass()

    def idle(self) -> None:
        """The reconciler has nothing left to do: what lives now is frozen (a full pass instead, when due)."""
        gc.freeze()
        if self._clock() - self._last_full < self._full_pass_s:
            return
        # get_freeze_count() walks every frozen object (0.6 ms per 300,000): once per due time, not per idle.
        if gc.get_freeze_count() * 4 >= self._frozen_after * 5:
            self.full_pass()
        else:
            self._last_full = self._clock()  # looked; the next look after another full_pass_s

    def full_pass(self) -> None:
        """Every object walked once: cycles among frozen ones are found too."""
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        self._last_full = self._clock()
        self._frozen_after = gc.get_freeze_count()
        self.full_passes += 1


def trim(load: Callable[[], Any | None] = load_libc) -> None:
    """Return free heap memory to the kernel (after a start or a resync: a few milliseconds)."""
    libc = load()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
