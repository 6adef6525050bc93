"""The host's timer interrupt: what takes a physical CPU back from a guest.

A guest that never exits would keep ``emu_start`` (and the caller of KVM_RUN) for
ever. On real hardware the host's timer interrupt forces a #VMEXIT (SVM_EXIT_INTR)
and KVM decides whether to go on. Here one daemon thread per process plays the
timer for every vCPU: a vCPU arms it with a deadline before it runs the guest, and
when a deadline passes while that vCPU is still inside the guest, the thread stops
the engine. Unicorn's own per-run timeout would start a thread for every run, which
costs more than a whole exit.

The thread holds vCPUs only weakly, so a vCPU that is dropped (its VM destroyed) is
not kept alive by its last deadline, and one thread serves any number of runs.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import weakref
from typing import Protocol

#: The longest single wait: ``Condition.wait`` refuses timeouts the C library cannot
#: represent, and a deadline years away is waited for in steps.
_LONGEST_WAIT = 3600.0


class Interruptible(Protocol):
    def time_is_up(self, deadline: float) -> bool:
        """Stop the guest if it is still running towards ``deadline``; True if it was."""
        ...


class _Timer:
    def __init__(self) -> None:
        self._queue: list[tuple[float, int, weakref.ref[Interruptible]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def arm(self, cpu: Interruptible, deadline: float) -> None:
        with self._wake:
            heapq.heappush(self._queue, (deadline, next(self._order), weakref.ref(cpu)))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sevsim-host-timer",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                deadline, _, ref = self._queue[0]
                remaining = deadline - time.monotonic()
                if remaining > 0:
                    self._wake.wait(min(remaining, _LONGEST_WAIT))
                    continue
                heapq.heappop(self._queue)
            cpu = ref()
            # A stop can race with the engine's start: repeat it while the guest runs
            # towards this deadline (a later run has a deadline of its own).
            while cpu is not None and cpu.time_is_up(deadline):
                time.sleep(0.002)
            del cpu


_TIMER = _Timer()


def arm(cpu: Interruptible, deadline: float) -> None:
    """Interrupt ``cpu`` at ``deadline`` (``time.monotonic()``), if it is still running."""
    _TIMER.arm(cpu, deadline)
