"""The VMM's run loop over every vCPU of a machine (QEMU's main loop and vCPU threads).

One thread runs the vCPUs in turn: before each KVM_RUN the loop moves the machine
clock (firing device timers), injects an interrupt the vCPU's local APIC holds with
KVM_INTERRUPT when the vCPU can take one or asks for an interrupt window when it
cannot, and bounds the run by the next timer deadline (and, when another vCPU is
runnable, by a time slice). A vCPU that halts waits, off the CPU, until an
interrupt or NMI can wake it; when every vCPU waits, time jumps (icount) or the loop
sleeps (host clock) to the next timer.

Two clock modes, as QEMU has:

``host``    guest time is the host time the vCPUs spend running guest code (what the
            hardware's counters report for each VMRUN): fast, not reproducible. Time
            the VMM spends handling exits does not count, so a slow exit path cannot
            drown the guest in timer interrupts.
``icount``  guest time is instructions retired (:data:`ICOUNT_NS_PER_INSN` each), and
            every run is bounded by an instruction budget, so the same guest and
            configuration produce the same exits on every run.

While several vCPUs are runnable, each run's time counts divided by their number,
as if they ran side by side. When every vCPU waits, time jumps to the next timer
(``idle="skip"``) or passes in real time (``idle="sleep"``, for a console a person
types into).

The run ends (:class:`RunEnd`) on a termination request, a shutdown, an internal
error or failed KVM_RUN, a reset, power-off or debug-exit request from the guest,
every vCPU halted with nothing that could wake it, or a limit (``timeout`` seconds,
``max_exits`` exits).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from enum import Enum

from attrs import frozen

from sevsim.errors import ConfigError
from sevsim.kvm.exits import (
    ApResetHold,
    Hlt,
    IrqWindowOpen,
    KvmExit,
    RunFailed,
    SystemEvent,
)
from sevsim.kvm.termination import describe_exit, is_sev_term, term_reason
from sevsim.kvm.vcpu import MpState, Vcpu
from sevsim.kvm.vm import Vm
from sevsim.vmm.pc import PcMachine
from sevsim.vmm.power import DebugExitRequest, PowerOffRequest, ResetRequest
from sevsim.vmm.runner import RunObserver

#: Guest nanoseconds per retired instruction in icount mode (QEMU's shift=0).
ICOUNT_NS_PER_INSN = 1
#: How long one vCPU may run while another is runnable: short, since a guest's vCPUs
#: spin on each other (a lock held by a vCPU that is not running, a wait for an AP),
#: and in icount mode a spin costs counted instructions.
TIME_SLICE_NS = 1_000_000
NS_PER_S = 1_000_000_000
#: The shortest run: a timer due sooner waits this long.
MIN_SLICE_NS = 100_000


def _sliced(exit_: KvmExit) -> bool:
    """Whether KVM_RUN returned because its slice (time or budget) was used up."""
    return isinstance(exit_, RunFailed) and exit_.errno == "EINTR" and exit_.plugin is None


class ClockMode(Enum):
    HOST = "host"
    ICOUNT = "icount"


class EndKind(Enum):
    """How a run ended, and the exit status ``sevsim run`` gives it."""

    TERMINATED = ("terminated", 0)  # termination request, reason set 0 code 0
    POWER_OFF = ("power-off", 0)  # ACPI S5
    HALTED = ("halted", 0)  # every vCPU halted, nothing can wake one
    FAILED = ("failed", 1)  # failure reason, shutdown, internal error, KVM_RUN error
    RESET = ("reset", 3)  # an SEV-ES guest cannot be reset: its state is sealed
    LIMIT = ("limit", 4)  # --timeout or --max-exits
    QUIT = ("quit", 5)  # the user left the console (Ctrl-A x)
    DEBUG_EXIT = ("debug-exit", -1)  # isa-debug-exit: (value << 1) | 1, as QEMU

    def __init__(self, label: str, status: int) -> None:
        self.label = label
        self.default_status = status


@frozen
class RunEnd:
    """Why a run ended; ``exit`` is the KVM exit behind it, if one was."""

    kind: EndKind
    why: str
    status: int
    vcpu: int | None = None
    exit: KvmExit | None = None

    @property
    def ok(self) -> bool:
        return self.status == 0


@frozen
class RunStats:
    exits: int
    wall_s: float
    guest_ns: int
    instructions: int | None


def _ns_to_s(ns: int) -> float:
    return ns / NS_PER_S


class Vmm:
    """Runs every vCPU of ``machine`` (attached to ``vm`` and launched) to the end.

    ``trace`` is the tool's observer of the run, given, never made here: it hears each
    exit to userspace, and knows the termination reasons kvm's events carried."""

    def __init__(
        self,
        vm: Vm,
        machine: PcMachine,
        *,
        trace: RunObserver | None = None,
        clock_mode: ClockMode = ClockMode.HOST,
        timeout: float | None = None,
        max_exits: int | None = None,
        poll_input: Callable[[], bytes | None] | None = None,
        idle: str = "skip",
    ) -> None:
        if max_exits is not None and (isinstance(max_exits, bool) or not isinstance(
                max_exits, int) or max_exits < 1):  # fmt: skip
            raise ConfigError(f"max_exits = {max_exits!r}: expected a whole number >= 1")
        if idle not in ("skip", "sleep"):
            raise ConfigError(f"idle = {idle!r}: expected 'skip' or 'sleep'")
        self.idle = idle
        self.vm = vm
        self.machine = machine
        self.trace = trace
        self.clock_mode = clock_mode
        self.timeout = timeout
        self.max_exits = max_exits
        #: Console input: bytes, b"" for none yet, None once the user quit.
        self.poll_input = poll_input
        self.exits = 0
        self._halted = [False] * len(vm.vcpus)
        #: Each vCPU's SIPI count when it halted (a later SIPI wakes it).
        self._sipis = [0] * len(vm.vcpus)
        self._next = 0
        self._start = 0.0
        #: Guest time: what the vCPUs ran, plus the idle time that passed.
        self._now = 0

    # -- the machine's requests -------------------------------------------------------

    def _request_end(self) -> RunEnd | None:
        """Act on the first thing the guest asked of the machine since the last exit."""
        if not self.machine.requests:
            return None
        request = self.machine.requests.pop(0)
        match request:
            case PowerOffRequest(source):
                return RunEnd(EndKind.POWER_OFF, f"the guest powered off ({source})", 0)
            case ResetRequest(source):
                return RunEnd(EndKind.RESET, f"the guest asked for a system reset ({source}); "
                              "an SEV-ES VM cannot be reset (its vCPU state is sealed in the "
                              "VMSAs): launch it again", EndKind.RESET.default_status)  # fmt: skip
            case DebugExitRequest(value):
                return RunEnd(EndKind.DEBUG_EXIT, f"isa-debug-exit: the guest wrote {value:#x}",
                              request.status)  # fmt: skip
        raise AssertionError(request)

    # -- time ---------------------------------------------------------------------------

    def _used(self, vcpu: Vcpu, ran_ns: int, retired: int) -> int:
        """Guest nanoseconds ``vcpu`` has used since its counters read these values."""
        if self.clock_mode is ClockMode.ICOUNT:
            return (vcpu.retired - retired) * ICOUNT_NS_PER_INSN
        return vcpu.guest_ns - ran_ns

    def _account(self, vcpu: Vcpu, ran_ns: int, retired: int, sharing: int) -> None:
        """Move guest time on by what one run of ``vcpu`` used, shared with the
        ``sharing`` vCPUs that were runnable beside it."""
        used = retired * ICOUNT_NS_PER_INSN if self.clock_mode is ClockMode.ICOUNT else ran_ns
        self._now += used // max(sharing, 1) + self.machine.clock.take_skipped()
        self.machine.clock.advance(self._now)

    def _idle(self) -> bool:
        """Every vCPU waits: let time pass to the next timer. False if nothing will
        ever wake a vCPU: none waits in HLT with interrupts on (a parked AP or one
        halted with IF=0 wakes only for what another vCPU sends), or no timer is armed
        and no input can come. The machine's own timers (RTC, PM timer) tick for
        ever, so they cannot be what decides."""
        interruptible = any(
            self._halted[index] and vcpu.mp_state is MpState.RUNNABLE and vcpu.if_flag
            for index, vcpu in enumerate(self.vm.vcpus)
        )
        deadline = self.machine.clock.next_deadline()
        if not interruptible or (deadline is None and self.poll_input is None):
            return False
        wait = 50_000_000 if deadline is None else max(0, deadline - self._now)
        if self.idle == "sleep" or deadline is None:
            wait = min(wait, 50_000_000)
            time.sleep(_ns_to_s(wait))
        self._now += wait
        self.machine.clock.advance(self._now)
        return True

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> RunEnd:
        self._start = time.monotonic()
        while True:
            end = self._step()
            if end is not None:
                return end

    def stats(self) -> RunStats:
        retired = sum(vcpu.retired for vcpu in self.vm.vcpus)
        return RunStats(self.exits, time.monotonic() - self._start, self._now,
                        retired if self.clock_mode is ClockMode.ICOUNT else None)

    def _step(self) -> RunEnd | None:
        end = self._request_end() or self._limits()
        if end is not None:
            return end
        if self.poll_input is not None:
            data = self.poll_input()
            if data is None:
                return RunEnd(EndKind.QUIT, "the user left the console",
                              EndKind.QUIT.default_status)  # fmt: skip
            self.machine.uart.input += data
        index = self._pick()
        if index is None:
            if not self._idle():
                return RunEnd(EndKind.HALTED, "every vCPU halted and nothing can wake one", 0)
            return None
        return self._run_vcpu(index)

    def _limits(self) -> RunEnd | None:
        if self.max_exits is not None and self.exits >= self.max_exits:
            return RunEnd(EndKind.LIMIT, f"--max-exits: {self.exits} exits",
                          EndKind.LIMIT.default_status)  # fmt: skip
        if self.timeout is not None and time.monotonic() - self._start >= self.timeout:
            return RunEnd(EndKind.LIMIT, f"--timeout: {self.timeout:g} s passed",
                          EndKind.LIMIT.default_status)  # fmt: skip
        return None

    def _can_run(self, index: int) -> bool:
        vcpu = self.vm.vcpus[index]
        if vcpu.mp_state is not MpState.RUNNABLE:
            return False
        if self._halted[index]:
            # A halted vCPU wakes for an interrupt it can take (kvm_run->if_flag, as
            # QEMU's cpu_has_work for a protected guest) or a pending NMI.
            # INIT-SIPI ends the halt too (QEMU's do_cpu_sipi): an SEV-ES AP that
            # halted in its reset code goes on after the HLT.
            wake = ((self.machine.interrupt_pending(index) and vcpu.if_flag)
                    or vcpu.wakeup_pending() or vcpu.sipis != self._sipis[index])  # fmt: skip
            if not wake:
                return False
            self._halted[index] = False
        return True

    def _pick(self) -> int | None:
        """The next runnable vCPU, round robin."""
        count = len(self.vm.vcpus)
        for step in range(count):
            index = (self._next + step) % count
            if self._can_run(index) or (
                self.vm.vcpus[index].mp_state is MpState.AP_RESET_HOLD
                and self.vm.vcpus[index].wakeup_pending()
            ):
                self._next = (index + 1) % count
                return index
        return None

    def _others_runnable(self, index: int) -> int:
        return sum(
            i != index and v.mp_state is MpState.RUNNABLE and not self._halted[i]
            for i, v in enumerate(self.vm.vcpus)
        )

    def _run_vcpu(self, index: int) -> RunEnd | None:
        vcpu = self.vm.vcpus[index]
        self.machine.current_vcpu = index
        self._inject(index, vcpu)
        sharing = 1 + self._others_runnable(index)
        slice_ns = self._slice_ns(sharing)
        ran_ns, retired = vcpu.guest_ns, vcpu.retired
        self.machine.clock.running = lambda: self._used(vcpu, ran_ns, retired) // sharing
        vcpu.immediate_exit = False
        wall_left = self._wall_left()
        if self.clock_mode is ClockMode.ICOUNT:
            budget = None if slice_ns is None else max(slice_ns // ICOUNT_NS_PER_INSN, 1)
            exit_ = vcpu.run(wall_left, budget)
        else:
            exit_ = vcpu.run(wall_left, slice_ns=slice_ns, plugin_timeout=wall_left)
        self.exits += 1
        ran_ns, retired = vcpu.guest_ns - ran_ns, vcpu.retired - retired
        if vcpu.immediate_exit:
            # The machine kicked it (an IPI woke another vCPU, a request came): the
            # loop acts on that, then this vCPU goes on with its slice first, since it
            # is likely inside its #VC handler holding what the others wait for.
            self._next = index
        elif slice_ns is not None and _sliced(exit_):
            # The slice ended the run: in icount mode it is over, however few of its
            # instructions the guest got (a stop lands at a block's start). Host time
            # is what the guest really ran: its slice ends on its own clock.
            retired = max(retired, slice_ns // ICOUNT_NS_PER_INSN)
        self._account(vcpu, ran_ns, retired, sharing)
        return self._after(index, vcpu, exit_)

    def _wall_left(self) -> float | None:
        """Seconds before ``timeout`` ends the run (at least a millisecond)."""
        if self.timeout is None:
            return None
        return max(self.timeout - (time.monotonic() - self._start), 1e-3)

    def _slice_ns(self, sharing: int) -> int | None:
        """How much guest time a vCPU may run: to the next timer, and one slice at
        most while another vCPU is runnable (its own time counts 1/``sharing``)."""
        deadline = self.machine.clock.next_deadline()
        limit = None if deadline is None else max(deadline - self._now, MIN_SLICE_NS) * sharing
        if sharing > 1:
            limit = TIME_SLICE_NS if limit is None else min(limit, TIME_SLICE_NS)
        return limit

    def _inject(self, index: int, vcpu: Vcpu) -> None:
        """QEMU's ``kvm_arch_pre_run``: KVM_INTERRUPT when the guest can take it, else
        ask for an exit as soon as it can."""
        pending = self.machine.interrupt_pending(index)
        if pending and vcpu.ready_for_interrupt_injection:
            vcpu.interrupt(self.machine.interrupt_vector(index))
            pending = self.machine.interrupt_pending(index)
        vcpu.request_interrupt_window = pending

    def _after(self, index: int, vcpu: Vcpu, exit_: KvmExit) -> RunEnd | None:
        if self.trace is not None and not isinstance(exit_, IrqWindowOpen | RunFailed):
            self.trace.record_exit(index, exit_)
        match exit_:
            case Hlt():
                self._halted[index] = True
                self._sipis[index] = vcpu.sipis
                return None
            case IrqWindowOpen() | ApResetHold():
                return None
            case RunFailed() if _sliced(exit_):
                return None
            case SystemEvent() if is_sev_term(exit_):
                reason = (self.trace.term_reason(exit_, index) if self.trace
                          else term_reason(exit_))  # fmt: skip
                if reason == (0, 0):
                    return RunEnd(EndKind.TERMINATED, "the guest asked to terminate "
                                  "(reason set 0 code 0)", 0, index, exit_)  # fmt: skip
        described = self.trace.describe_exit(exit_, index) if self.trace else describe_exit(exit_)
        return RunEnd(EndKind.FAILED, f"vCPU {index}: {described}", 1, index, exit_)
