"""Arming the host timer wakes its thread only for a new earliest deadline.

The thread sleeps until the earliest queued deadline; a vCPU that arms a later one at
every entry (a guest-time slice) must not make it wake (and take the GIL) each time.
"""

import threading
import time

from sevsim.hw import watchdog


class _Target:
    def __init__(self) -> None:
        self.calls: list[float] = []
        self.stopped = threading.Event()

    def time_is_up(self, deadline: float) -> bool:
        self.calls.append(deadline)
        self.stopped.set()
        return False


def test_only_a_new_earliest_deadline_wakes_the_thread(monkeypatch):
    timer = watchdog._Timer()
    target = _Target()
    now = time.monotonic()
    timer.arm(target, now + 100)  # starts the thread
    woken: list[int] = []
    monkeypatch.setattr(timer._wake, "notify", lambda n=1: woken.append(n))
    timer.arm(target, now + 200)  # later than the queued one: no wake-up
    timer.arm(target, now + 200)  # the same deadline again: nothing queued
    assert woken == []
    assert len(timer._queue) == 2
    timer.arm(_Target(), now + 50)  # a new earliest: the thread must look again
    assert woken == [1]


def test_a_deadline_armed_behind_a_later_one_still_fires():
    timer = watchdog._Timer()
    late, soon = _Target(), _Target()
    now = time.monotonic()
    timer.arm(late, now + 60)
    timer.arm(soon, now + 0.05)  # earliest: wakes the thread, which waits less
    assert soon.stopped.wait(5)
    assert soon.calls and not late.calls
