"""Guest time of the CPU model's runs when time comes from the host's clock.

On hardware a guest's clock advances while the guest runs. Here a run of the CPU
model (one ``emu_start``) also holds the simulator's own work: Python hooks that
Unicorn calls from inside the run (TLB fills, new blocks, sensitive-instruction
hooks) and a fixed cost to enter and leave the engine, each far slower than the
hardware they stand for. Counted as guest time, they made OVMF's timer interrupts
come so often that handling one tick (about sixty exits) took most of the next
tick's time, and the firmware crawled from tick to tick.

So a run is charged the CPU time the host thread spent in it (not wall time: a busy
host that takes the CPU away from the simulator must not make the guest's clock run
faster) minus the time its hooks took, minus the engine's fixed cost. Hooks are
timed on the monotonic clock (:data:`hook_clock`), not the thread's: a few hooks run
in every exit, and reading the thread's CPU time is a system call (about 1.5 µs on
this project's machine, against 0.1 µs). The price is a hook during which the host
took the CPU away: it counts more than the run spent, so the run's guest time is
clamped at zero — a guest clock that lags for one run, never one that races. The
fixed cost is the shortest run seen so far, hooks excluded (a run that stopped
before its first instruction: a block dropped for retranslation, a hooked
instruction at the start), and at most :data:`FIXED_COST_NS` — a guest that computes
for long without an exit never shows a short run, and its first long one must not
be taken for the cost of starting. In icount mode none of this matters: time there
is counted in instructions.
"""

from __future__ import annotations

from collections.abc import Callable
from time import perf_counter_ns, thread_time_ns
from typing import Any

#: The clock hooks are timed with (nanoseconds, monotonic; see the module doc).
hook_clock = perf_counter_ns

#: The most a run's fixed cost is taken to be (measured on this project's machine:
#: 20 µs from ``_emulate``'s start to its end for a run that executed nothing).
FIXED_COST_NS = 20_000


class RunClock:
    """Host nanoseconds one engine spent on guest code."""

    __slots__ = ("_fixed_ns", "hooks_ns")

    def __init__(self) -> None:
        #: Time spent in hooks (:data:`hook_clock`), all runs together.
        self.hooks_ns = 0
        self._fixed_ns = FIXED_COST_NS

    def timed(self, hook: Callable[..., Any]) -> Callable[..., Any]:
        """``hook`` with the time it takes left out of guest time."""

        def timed_hook(*args: Any) -> Any:
            began = hook_clock()
            try:
                return hook(*args)
            finally:
                self.hooks_ns += hook_clock() - began

        return timed_hook

    def begin(self) -> tuple[int, int]:
        """Mark the start of a run: pass the result to :meth:`end`."""
        return thread_time_ns(), self.hooks_ns

    def end(self, mark: tuple[int, int]) -> int:
        """The guest time of the run that began at ``mark``."""
        began, hooks = mark
        spent = thread_time_ns() - began - (self.hooks_ns - hooks)
        if spent <= 0:  # a hook was descheduled: no fixed cost learnt from this run
            return 0
        if spent < self._fixed_ns:
            self._fixed_ns = spent
        return spent - self._fixed_ns
