"""Guest time for the VMM's devices: one clock per machine, and timers on it.

Devices (the PIT, the RTC, each local APIC's timer, the ACPI PM timer) read the
machine's time from :class:`MachineClock` and arm :class:`Timer` objects on it; they
never read the host clock themselves. The run loop owns the clock: it moves it
forward (from the host's monotonic clock, or, with ``--icount``, from the number of
guest instructions executed) and fires the timers that came due, so that the same
guest with the same inputs sees the same times when time is counted in
instructions.

Time is in nanoseconds since the machine was created.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

from sevsim.errors import SevsimError


class ClockError(SevsimError):
    """The clock was moved backwards, or a timer was armed with a bad deadline."""


class Timer:
    """A one-shot timer a device owns: armed for a deadline, re-armed for the next.

    The callback runs when the clock reaches the deadline (at the run loop's next
    look at the clock, never from another thread); it may re-arm the timer, which is
    how periodic devices work.
    """

    __slots__ = ("_callback", "_clock", "_deadline", "_generation", "name")

    def __init__(self, clock: MachineClock, callback: Callable[[], None], name: str) -> None:
        self._clock = clock
        self._callback = callback
        self._deadline: int | None = None
        self._generation = 0
        self.name = name

    @property
    def deadline(self) -> int | None:
        """When the timer fires (ns), or None when it is not armed."""
        return self._deadline

    def arm(self, deadline_ns: int) -> None:
        """Fire at ``deadline_ns``; replaces any earlier arming. A deadline in the past
        fires at the clock's next advance."""
        if not isinstance(deadline_ns, int) or deadline_ns < 0:
            raise ClockError(f"timer {self.name!r}: deadline {deadline_ns!r} is not a time >= 0 ns")
        self._generation += 1
        self._deadline = deadline_ns
        self._clock._schedule(self, deadline_ns, self._generation)

    def cancel(self) -> None:
        self._generation += 1
        self._deadline = None

    def _fire(self, generation: int) -> bool:
        """Run the callback if this queue entry is still the current arming."""
        if generation != self._generation or self._deadline is None:
            return False
        self._deadline = None
        self._callback()
        return True


#: Two reads of a time source closer than this (guest time) are a busy-wait.
POLL_GAP_NS = 50_000
#: What each read of a busy-wait moves time on by: the first step, and the most.
POLL_STEP_NS = (1_000, 1_000_000)


class MachineClock:
    """The machine's time, moved forward only by the run loop.

    ``now_ns`` is what every device reads; :meth:`advance` sets a later time and fires
    the timers due by then, earliest first (timers due at the same time fire in the
    order they were armed). Between two advances a vCPU keeps running, handling exits
    inside KVM_RUN: :attr:`running` (set by the run loop) says how far its time has
    gone since, so a device it reads (a PM timer it polls) sees time move.

    A guest that reads a time source over and over, with hardly any time passing in
    between, is waiting for time to pass (OVMF's ``MicroSecondDelay`` polls the ACPI
    PM timer). On hardware each read costs about a microsecond; here it is an exit
    that costs the host a thousand times more, and a few milliseconds of delay took
    minutes of OVMF's boot. So each such read (:meth:`polled`) moves time on by a
    step that doubles while the spin goes on (up to a millisecond) and starts small
    again once the guest does something else or the clock is advanced: the guest
    sees a slow host, never time going back. A skip stops at the next timer's
    deadline and calls :attr:`on_due` (the machine kicks the running vCPU, so that
    the run loop fires the timer); the loop folds the skipped time into its own
    (:meth:`take_skipped`).
    """

    def __init__(self) -> None:
        self._now = 0
        self._queue: list[tuple[int, int, int, Timer]] = []
        self._order = itertools.count()
        #: Guest nanoseconds the running vCPU has used since the last advance.
        self.running: Callable[[], int] | None = None
        self._skipped = 0
        self._last_poll: int | None = None
        self._step = 0
        #: Called when a busy-wait's skip reaches the next timer's deadline.
        self.on_due: Callable[[], None] | None = None

    def now_ns(self) -> int:
        now = self._now + self._skipped
        return now if self.running is None else now + max(self.running(), 0)

    def polled(self) -> None:
        """A time source was read: if the last read was only just before, the guest
        spins on it, and time skips ahead."""
        now = self.now_ns()
        if self._last_poll is not None and now - self._last_poll < POLL_GAP_NS:
            first, most = POLL_STEP_NS
            self._step = min(2 * self._step, most) if self._step else first
            deadline = self.next_deadline()
            step = self._step if deadline is None else max(min(self._step, deadline - now), 0)
            self._skipped += step
            if step < self._step and self.on_due is not None:
                self.on_due()
        else:
            self._step = 0
        self._last_poll = self.now_ns()

    def take_skipped(self) -> int:
        """The time busy-waits skipped since the last call, for the run loop to add to
        its own before it next advances the clock."""
        skipped, self._skipped = self._skipped, 0
        return skipped

    def timer(self, callback: Callable[[], None], name: str = "timer") -> Timer:
        """A new, unarmed timer that calls ``callback`` when it fires."""
        return Timer(self, callback, name)

    def _schedule(self, timer: Timer, deadline: int, generation: int) -> None:
        heapq.heappush(self._queue, (deadline, next(self._order), generation, timer))

    def next_deadline(self) -> int | None:
        """The earliest armed timer's deadline, or None: how long the run loop may let
        a vCPU run before a device needs attention."""
        while self._queue:
            deadline, _, generation, timer = self._queue[0]
            if generation == timer._generation and timer.deadline == deadline:
                return deadline
            heapq.heappop(self._queue)  # cancelled or re-armed since
        return None

    def advance(self, now_ns: int) -> int:
        """Move time to ``now_ns`` (never backwards) and fire every timer due by then;
        returns how many fired.

        Each callback runs with the clock at its own deadline, so a periodic device
        that re-arms "one period from now" keeps its rhythm across a long advance.
        """
        if now_ns < self._now + self._skipped:
            raise ClockError(f"machine clock cannot go back from {self._now + self._skipped} ns "
                             f"to {now_ns} ns")  # fmt: skip
        self._skipped = 0
        self._last_poll, self._step = None, 0
        self.running = None
        fired = 0
        while self._queue and self._queue[0][0] <= now_ns:
            deadline, _, generation, timer = heapq.heappop(self._queue)
            self._now = max(self._now, deadline)
            fired += timer._fire(generation)
        self._now = now_ns
        return fired
