"""Typed results of ``Vcpu.run()``: what KVM_RUN would leave in ``struct kvm_run``.

Modelled on rust-vmm's ``VcpuExit``: one frozen class per ``KVM_EXIT_*`` reason the
SEV-ES paths produce, each carrying the fields userspace reads. A KVM_RUN that would
fail with an errno is the :class:`RunFailed` exit, so that nothing a guest does can
raise out of the run loop.
"""

from __future__ import annotations

from enum import IntEnum

from attrs import field, frozen
from attrs.validators import instance_of, optional


class KvmExitReason(IntEnum):
    """``KVM_EXIT_*`` numbers from the uapi header."""

    IO = 2
    HYPERCALL = 3
    HLT = 5
    IRQ_WINDOW_OPEN = 7
    MMIO = 6
    SHUTDOWN = 8
    FAIL_ENTRY = 9
    INTERNAL_ERROR = 17
    SYSTEM_EVENT = 24
    AP_RESET_HOLD = 32


class SystemEventType(IntEnum):
    """``KVM_SYSTEM_EVENT_*``."""

    SHUTDOWN = 1
    RESET = 2
    CRASH = 3
    WAKEUP = 4
    SUSPEND = 5
    SEV_TERM = 6


class InternalErrorSub(IntEnum):
    """``KVM_INTERNAL_ERROR_*`` suberrors."""

    EMULATION = 1
    SIMUL_EX = 2
    DELIVERY_EV = 3
    UNEXPECTED_EXIT_REASON = 4


def _u64s(instance: object, attribute: object, value: object) -> None:
    """``data`` words: a tuple of integers that fit 64 bits, as in ``struct kvm_run``."""
    if not isinstance(value, tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 64 for v in value
    ):
        raise TypeError(f"exit data must be a tuple of u64 integers, not {value!r}")


_STR = instance_of(str)


@frozen
class KvmExit:
    """Base of every exit; ``reason`` is the KVM_EXIT_* number (None for RunFailed)."""

    reason: KvmExitReason | None = field(init=False, default=None)

    def describe(self) -> str:
        return type(self).__name__


@frozen
class SystemEvent(KvmExit):
    """KVM_EXIT_SYSTEM_EVENT; SEV_TERM carries the guest's termination request."""

    type: SystemEventType = field(validator=instance_of(SystemEventType))
    data: tuple[int, ...] = field(default=(), validator=_u64s)
    reason: KvmExitReason = field(init=False, default=KvmExitReason.SYSTEM_EVENT)

    def describe(self) -> str:
        data = ", ".join(f"{d:#x}" for d in self.data)
        return f"system event {self.type.name} [{data}]"


@frozen
class Shutdown(KvmExit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or VMRUN found a tampered VMSA).

    KVM learns nothing more; the simulator's view (``sim_exit``) says which."""

    reason: KvmExitReason = field(init=False, default=KvmExitReason.SHUTDOWN)

    def describe(self) -> str:
        return "shutdown"


@frozen
class Hlt(KvmExit):
    """KVM_EXIT_HLT: the guest halted with no event pending (no in-kernel LAPIC)."""

    reason: KvmExitReason = field(init=False, default=KvmExitReason.HLT)


@frozen
class InternalError(KvmExit):
    """KVM_EXIT_INTERNAL_ERROR with its suberror and data words."""

    suberror: InternalErrorSub = field(validator=instance_of(InternalErrorSub))
    data: tuple[int, ...] = field(default=(), validator=_u64s)
    why: str = field(default="", validator=_STR)
    reason: KvmExitReason = field(init=False, default=KvmExitReason.INTERNAL_ERROR)

    def describe(self) -> str:
        data = ", ".join(f"{d:#x}" for d in self.data)
        text = f"internal error {self.suberror.name} [{data}]"
        return f"{text}: {self.why}" if self.why else text


@frozen
class FailEntry(KvmExit):
    """KVM_EXIT_FAIL_ENTRY: VMRUN refused the guest state (SVM_EXIT_ERR)."""

    hardware_entry_failure_reason: int = field(validator=instance_of(int))
    reason: KvmExitReason = field(init=False, default=KvmExitReason.FAIL_ENTRY)

    def describe(self) -> str:
        return f"entry failed (reason {self.hardware_entry_failure_reason:#x})"


@frozen
class IrqWindowOpen(KvmExit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt now (the VMM asked
    with ``request_interrupt_window``); inject it with ``Vcpu.interrupt``."""

    reason: KvmExitReason = field(init=False, default=KvmExitReason.IRQ_WINDOW_OPEN)


@frozen
class ApResetHold(KvmExit):
    """KVM_EXIT_AP_RESET_HOLD: an AP parked itself until the next SIPI."""

    reason: KvmExitReason = field(init=False, default=KvmExitReason.AP_RESET_HOLD)


@frozen
class RunFailed(KvmExit):
    """KVM_RUN returned an error (``-errno``) instead of an exit; ``why`` says what failed.

    ``plugin`` names the plugin whose handler raised, when that is the cause;
    ``exit`` is what KVM left in ``struct kvm_run`` before failing, if anything (the
    5.11 era fills an internal-error exit, then fails KVM_RUN with -EINVAL).
    """

    errno: str = field(validator=_STR)
    why: str = field(validator=_STR)
    plugin: str | None = field(default=None, validator=optional(_STR))
    exit: KvmExit | None = field(default=None, validator=optional(instance_of(KvmExit)))

    def describe(self) -> str:
        who = f" [plugin {self.plugin}]" if self.plugin else ""
        return f"KVM_RUN failed: -{self.errno}: {self.why}{who}"
