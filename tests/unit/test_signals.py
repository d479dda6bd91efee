"""Signals reach the agent's loop even when its self-pipe is full (agent/signals.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

import pytest

from egressd.agent import signals

FILL = 200_000  # wakeups handed to a busy loop: far more than its self-pipe holds


async def _signal_after_filling(install: str) -> bool:
    """Install a SIGUSR1 handler the given way, fill the loop's self-pipe while the loop is busy (this
    coroutine never yields), send SIGUSR1, and tell whether the handler ran."""
    loop = asyncio.get_running_loop()
    got = asyncio.Event()
    if install == "asyncio":
        loop.add_signal_handler(signal.SIGUSR1, got.set)
    else:
        signals.install(loop, {signal.SIGUSR1: got.set})
    try:
        for _ in range(FILL):
            loop.call_soon_threadsafe(lambda: None)
        _fill_wakeup_fd()
        os.kill(os.getpid(), signal.SIGUSR1)
        try:
            await asyncio.wait_for(got.wait(), 2.0)
        except TimeoutError:
            return False
        return True
    finally:
        if install == "asyncio":
            loop.remove_signal_handler(signal.SIGUSR1)
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def _fill_wakeup_fd() -> None:
    """Fill the descriptor the C-level handler writes a signal's byte to, if one is set (asyncio sets its
    self-pipe when it handles a signal): what thousands of wakeups from other threads do to a busy loop."""
    fd = signal.set_wakeup_fd(-1)
    if fd < 0:
        return
    signal.set_wakeup_fd(fd)
    with contextlib.suppress(BlockingIOError):
        for _ in range(FILL):
            os.write(fd, b"\0")  # signal 0: no handler, ignored when the loop reads it


def test_a_signal_is_handled_when_the_self_pipe_is_full():
    assert asyncio.run(_signal_after_filling("egressd")) is True


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # the dropped byte, reported
def test_control_asyncio_loses_that_signal():
    """The control: with asyncio's own add_signal_handler the same signal is lost, so the test above can
    fail, and is why agent/signals.py exists."""
    assert asyncio.run(_signal_after_filling("asyncio")) is False


def test_a_signal_after_the_loop_closed_is_ignored():
    loop = asyncio.new_event_loop()
    signals.install(loop, {signal.SIGUSR1: lambda: None})
    loop.close()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)  # no traceback, no exit
    finally:
        signal.signal(signal.SIGUSR1, signal.SIG_DFL)
