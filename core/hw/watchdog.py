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

The same timer bounds the host code KVM_RUN runs between VMRUNs: plugins' exit
handlers, lifecycle hooks and observers (:func:`run_foreign`, inside
:func:`foreign_time_limit`). Why an asynchronous exception
(``PyThreadState_SetAsyncExc``) and not the alternatives:

- a trace function (``sys.settrace``) checking the clock costs a Python call per
  line of every plugin, on every exit (measured here: +10..25 % per exit), and
  switches itself off the first time it raises;
- a worker thread per call costs two thread switches per exit, and a plugin that
  never returns keeps its thread (and a share of the GIL) for the life of the process;
- an asynchronous exception costs nothing until the limit passes (two attribute
  stores per call), works on any thread (signals only reach the main thread), and
  stops the plugin itself: it is raised in that thread at the next bytecode
  boundary, repeated every :data:`RECHECK` seconds while the thread is still in
  plugin code (a plugin that catches it once does not escape), and only ever
  raised while the thread is inside plugin code. The exception,
  :class:`~sevsim.errors.PluginOverran`, is a BaseException, past a plugin's
  ``except Exception``; kvm contains it as the plugin's fault, names the plugin and
  ends the VM, whose state the interrupted code may have left half-changed.

What no mechanism inside the process can do is take back a thread blocked inside
one C call (``time.sleep``, a lock that is never released): the exception arrives
when that call returns to Python.
"""

from __future__ import annotations

import ctypes
import heapq
import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol, TypeVar

from sevsim.errors import ForeignBaseException, PluginOverran

#: The longest single wait: ``Condition.wait`` refuses timeouts the C library cannot
#: represent, and a deadline years away is waited for in steps.
_LONGEST_WAIT = 3600.0
#: How soon the timer looks again at something still running past its deadline.
RECHECK = 0.002
#: Fewest queued entries before the queue is swept of entries whose target is gone.
_SWEEP_AT = 64


class Interruptible(Protocol):
    def time_is_up(self, deadline: float) -> bool:
        """Stop the guest if it is still running towards ``deadline``; True if it was."""
        ...


#: A queued deadline: (when to look, order, target, the deadline it was armed with).
_Entry = tuple[float, int, "weakref.ref[Interruptible]", float]


class _Timer:
    def __init__(self) -> None:
        self._queue: list[_Entry] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        #: The last deadline queued for each target: a vCPU that re-enters the guest
        #: many times towards one deadline (one per exit) queues it once.
        self._armed: weakref.WeakKeyDictionary[Interruptible, float] = (
            weakref.WeakKeyDictionary())  # fmt: skip
        self._sweep_at = _SWEEP_AT

    def arm(self, target: Interruptible, deadline: float) -> None:
        """Queue ``deadline`` for ``target``.

        The thread sleeps until the earliest entry, so it needs waking only when the
        new entry is the earliest: a vCPU that arms a later deadline at each entry (a
        guest-time slice) does not wake it, nor switch the host to it, every time."""
        with self._wake:
            if self._armed.get(target) == deadline:
                return
            self._armed[target] = deadline
            first = self._push(deadline, weakref.ref(target), deadline)
            if len(self._queue) > self._sweep_at:  # targets gone before their deadline
                self._queue = [e for e in self._queue if e[2]() is not None]
                heapq.heapify(self._queue)
                self._sweep_at = max(_SWEEP_AT, 2 * len(self._queue))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sevsim-host-timer",
                                                daemon=True)  # fmt: skip
                self._thread.start()
            elif first:
                self._wake.notify()

    def _push(self, when: float, ref: weakref.ref[Interruptible], deadline: float) -> bool:
        """Queue an entry; True if it is now the earliest."""
        order = next(self._order)
        heapq.heappush(self._queue, (when, order, ref, deadline))
        return self._queue[0][1] == order

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                when, _, ref, deadline = self._queue[0]
                remaining = when - time.monotonic()
                if remaining > 0:
                    self._wake.wait(min(remaining, _LONGEST_WAIT))
                    continue
                heapq.heappop(self._queue)
                target = ref()
                if target is not None and self._armed.get(target) == deadline:
                    del self._armed[target]  # from now on, arming it again queues it
            # A stop can race with the engine's start, and plugin code may go on past
            # its deadline: look again soon while the target still runs towards this
            # deadline (a later run has a deadline of its own). Never wait here: other
            # targets' deadlines are due meanwhile.
            if target is not None and target.time_is_up(deadline):
                with self._wake:
                    self._push(time.monotonic() + RECHECK, ref, deadline)
            del target


_TIMER = _Timer()


def arm(cpu: Interruptible, deadline: float) -> None:
    """Interrupt ``cpu`` at ``deadline`` (``time.monotonic()``), if it is still running."""
    _TIMER.arm(cpu, deadline)


# -- host code: what KVM_RUN runs between VMRUNs ------------------------------------------------

T = TypeVar("T")

_raise_in = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.py_object)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))
_clear_in = ctypes.PYFUNCTYPE(ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)(
    ("PyThreadState_SetAsyncExc", ctypes.pythonapi))


class _ThreadClock:
    """One thread's time limit for foreign code, and whether it is running some."""

    __slots__ = ("__weakref__", "deadline", "inside", "raised", "tid")

    def __init__(self) -> None:
        self.tid = threading.get_ident()
        self.deadline: float | None = None
        self.inside = False
        #: An exception was sent to this thread and may not have been raised yet.
        self.raised = False

    def time_is_up(self, deadline: float) -> bool:
        """Called by the host timer (holding the GIL, between no two bytecodes of the
        owning thread): interrupt the foreign code this thread runs, if any; True
        while the thread still works towards ``deadline``."""
        if self.deadline != deadline:
            return False
        if self.inside:
            self.raised = True
            _raise_in(self.tid, PluginOverran)
        return True


_local = threading.local()


def _clock() -> _ThreadClock:
    clock: _ThreadClock | None = getattr(_local, "clock", None)
    if clock is None:
        clock = _local.clock = _ThreadClock()
    return clock


@contextmanager
def foreign_time_limit(deadline: float | None) -> Iterator[None]:
    """Foreign code this thread runs (:func:`run_foreign`) until the block ends must be
    done by ``deadline`` (``time.monotonic()``; None: no limit): KVM_RUN's limit."""
    clock = _clock()
    outer = clock.deadline
    clock.deadline = deadline
    if deadline is not None:
        _TIMER.arm(clock, deadline)
    try:
        yield
    finally:
        clock.deadline = outer
        if clock.raised and not clock.inside:
            clock.raised = False
            _clear_in(clock.tid, None)


def run_foreign(code: Callable[..., T], /, *args: object, **kwargs: object) -> T:
    """Call foreign code (a plugin's) within this thread's time limit.

    Whatever it raises comes out as it is, except a BaseException subclass other than
    SystemExit, KeyboardInterrupt and :class:`~sevsim.errors.PluginOverran`, which
    comes out as a :class:`~sevsim.errors.ForeignBaseException` (so that the callers'
    ``except FOREIGN_FAULTS`` contains it). An exception the timer sent that was not
    raised before the code returned is withdrawn here: none lands in sevsim's own code.
    """
    try:
        clock: _ThreadClock = _local.clock  # _clock(), inline: an attribute read
    except AttributeError:
        clock = _clock()
    outer = clock.inside
    clock.inside = True
    try:
        return code(*args, **kwargs)
    except (Exception, SystemExit, KeyboardInterrupt, PluginOverran):
        raise
    except BaseException as exc:
        raise ForeignBaseException(exc).with_traceback(exc.__traceback__) from exc
    finally:
        # Plain stores and a C call: no bytecode boundary where the timer could run
        # between leaving the foreign code and withdrawing what it sent.
        clock.inside = outer
        if clock.raised and not outer:
            clock.raised = False
            _clear_in(clock.tid, None)
