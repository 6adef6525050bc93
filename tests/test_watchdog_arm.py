"""Arming the host timer wakes its thread only for a new earliest deadline, and a vCPU
queues each deadline once.

The thread sleeps until the earliest queued deadline; a vCPU that arms a later one at
every entry (a guest-time slice) must not make it wake (and take the GIL) each time.
A vCPU that re-enters the guest towards the same deadline after each exit of a
KVM_RUN does not queue it again, unless it has passed (its entry may have fired while
nothing ran); nor does one that re-enters towards a later deadline: its queued entry
hands that deadline on when it fires.
"""

import threading
import time

from attrs import frozen
from unicorn import UcError

from sevsim.guest.snippets import TERMINATE
from sevsim.hw import watchdog
from sevsim.hw.cpu import GuestCpu
from sevsim.hw.engine import TIMER_ERROR
from sevsim.hw.inspect import cpu_of
from sevsim.kvm.exits import RunFailed, SystemEvent
from sevsim.testing import run_guest


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


# -- the CPU's use of it: one entry per deadline ----------------------------------------


def test_a_kvm_run_queues_its_deadline_once_however_many_exits(monkeypatch):
    """50 CR8 write traps (exits) in one KVM_RUN: every VMRUN runs towards the same
    deadline, which the timer holds from the first."""
    armed: list[float] = []
    arm = watchdog.arm

    def counted(cpu: object, deadline: float) -> None:
        armed.append(deadline)
        arm(cpu, deadline)

    monkeypatch.setattr(watchdog, "arm", counted)
    traps = "mov cr8, rax\n" * 50
    run = run_guest(f"mov eax, 2\n{traps}{TERMINATE}", enable=["msr_protocol", "crtraps"],
                    timeout=30)  # fmt: skip
    assert isinstance(run.exit, SystemEvent), run.exit
    assert run.vm.vcpus[0].plugin_states["crtraps"].cr8 == 2
    assert len(armed) == 1


def spinning_cpu() -> GuestCpu:
    """The CPU of a guest that spins for ever (its KVM_RUN already ended by timeout)."""
    run = run_guest("spin:\njmp spin", timeout=0.05)
    assert isinstance(run.exit, RunFailed) and run.exit.errno == "EINTR", run.exit
    cpu = cpu_of(run.vm.vcpus[0].vmsa)
    assert cpu is not None
    return cpu


@frozen
class Stop:
    """How a run on its own thread ended: when it began and ended (time.monotonic)."""

    errno: int
    began: float
    ended: float


def run_until_stopped(cpu: GuestCpu) -> Stop:
    """One run of ``cpu`` (its deadline set by the caller) on a thread named "run"; it
    must end within 5 s, through the timer's stop (GuestCpu.run takes that error)."""
    done = threading.Event()
    stops: list[Stop] = []

    def emulate() -> None:
        began = time.monotonic()
        try:
            cpu._emulate(cpu.regs.rip)
        except UcError as err:
            stops.append(Stop(err.errno, began, time.monotonic()))
        finally:
            done.set()

    threading.Thread(target=emulate, name="run", daemon=True).start()
    try:
        assert done.wait(5), "the run went on past its deadline"
    finally:
        if not done.is_set():
            cpu.engine.interrupt()
    (stop,) = stops
    return stop


def test_a_deadline_that_passed_between_runs_still_ends_the_next_one():
    """The timer fired while the CPU was between runs (nothing to stop) and the CPU
    then enters the guest towards that same deadline: the run must still end."""
    cpu = spinning_cpu()
    cpu.deadline = cpu._armed = time.monotonic() - 1  # queued, and fired while nothing ran
    assert run_until_stopped(cpu).errno == TIMER_ERROR


def test_a_later_deadline_is_handed_on_by_the_queued_entry_not_queued_again(monkeypatch):
    """With a guest-time slice every entry computes a later wall deadline. The CPU keeps
    its one queued entry; when that fires during a run towards a later deadline, the
    run goes on and that deadline is queued then, and the run stops there."""
    cpu = spinning_cpu()
    armed: list[tuple[float, str]] = []
    arm = watchdog.arm

    def counted(target: object, deadline: float) -> None:
        armed.append((deadline, threading.current_thread().name))
        arm(target, deadline)

    monkeypatch.setattr(watchdog, "arm", counted)
    now = time.monotonic()
    early, late = now + 0.2, now + 0.5
    watchdog.arm(cpu, early)  # what an earlier run left queued
    cpu._armed, cpu.deadline, cpu.guest_limit = early, late, None
    stop = run_until_stopped(cpu)
    assert stop.errno == TIMER_ERROR
    assert stop.ended >= late - 0.01, f"stopped {late - stop.ended:.3f} s before its own deadline"
    assert {deadline for deadline, _ in armed} == {early, late}
    if stop.began < early:  # the early entry was still queued when the run began:
        assert [who for _, who in armed if who == "run"] == []  # it queued nothing
        assert (late, "sevsim-host-timer") in armed  # the timer handed the deadline on
