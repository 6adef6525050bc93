"""NMIs for SEV-ES guests (REFERENCE.md section 7): injection and NMI_COMPLETE.

KVM injects an NMI through EVENTINJ and then treats NMIs as masked until the guest
is done with it. For an ordinary guest KVM learns that by intercepting IRET; an
SEV-ES guest's IRET cannot be intercepted, so its NMI handler ends with an
NMI_COMPLETE VMGEXIT (0x80000003). This plugin is that feature area:

- KVM_NMI (``Vcpu.nmi()``) queues an NMI (``nmi_queued``);
- before each entry, queued NMIs fold into the pending count (at most two, one while
  an NMI is in service: ``process_nmi``), and one is injected when NMIs are not
  masked (``svm_inject_nmi``); if EVENTINJ is taken this entry, an immediate exit
  lets it in at the next one;
- NMI_COMPLETE unmasks NMIs at once (newest KVM; 5.11 waited for the next exit,
  which a guest cannot tell apart) and the next entry injects a pending one;
- a pending NMI wakes a vCPU parked in AP reset hold (``kvm_vcpu_has_events``).

Without this plugin KVM_NMI fails (the VMM learns no NMI can be injected) and
NMI_COMPLETE is an invalid event: what a KVM without SEV-ES NMI support would do.
"""

from __future__ import annotations

from collections.abc import Iterator

from attrs import define

from sevsim import hookimpl
from sevsim.arch.exits import VmgExit
from sevsim.arch.vmcb import EventInj
from sevsim.kvm.context import ExitContext, VcpuView
from sevsim.kvm.dispatch import ExitHandler, ExitKind

#: EVENTINJ of an NMI as ``svm_inject_nmi`` writes it (the CPU uses vector 2).
NMI_EVENT = EventInj.VALID | EventInj.TYPE_NMI << EventInj.TYPE_SHIFT


@define
class NmiState:
    """``vcpu->arch.nmi_queued / nmi_pending`` and the SVM ``nmi_masked`` flag."""

    #: KVM_NMI calls since the last entry (``nmi_queued``).
    queued: int = 0
    pending: int = 0
    masked: bool = False
    #: ``stat.nmi_window_exits``: NMI_COMPLETEs seen.
    window_exits: int = 0

    def process(self) -> None:
        """``process_nmi``: fold queued NMIs into pending; at most one waits behind a
        masked (in-service) NMI, two otherwise."""
        limit = 1 if self.masked else 2
        self.pending = min(self.pending + self.queued, limit)
        self.queued = 0

    def take(self) -> bool:
        """Inject one if allowed (``svm_inject_nmi``): it is then in service, masked."""
        if not self.pending or self.masked:
            return False
        self.pending -= 1
        self.masked = True
        return True


@hookimpl
def sevsim_vcpu_state() -> NmiState:
    return NmiState()


@hookimpl
def sevsim_vcpu_nmi(vcpu: VcpuView) -> bool:
    """KVM_NMI: queue one; it is injected at an entry when NMIs are unmasked."""
    vcpu.state.queued += 1
    return True


@hookimpl
def sevsim_vcpu_events(vcpu: VcpuView) -> bool:
    """``inject_pending_event``: an NMI goes into EVENTINJ unless another event (an
    exception KVM queued) already occupies it this entry; then True, for an immediate
    exit that lets the NMI in at the next entry."""
    nmi: NmiState = vcpu.state
    if not (nmi.queued or nmi.pending):
        return False
    nmi.process()
    if vcpu.event_pending:
        return bool(nmi.pending)  # -EBUSY, whether or not NMIs are masked
    if nmi.take():
        vcpu.queue_event(NMI_EVENT)
    return False


@hookimpl
def sevsim_vcpu_wakeup(vcpu: VcpuView) -> bool:
    """``kvm_vcpu_has_events``: an NMI that can be injected wakes a parked vCPU."""
    nmi: NmiState = vcpu.state
    return bool(nmi.queued or (nmi.pending and not nmi.masked))


def nmi_complete(ctx: ExitContext) -> None:
    """Unmask NMIs and count the window exit (``stat.nmi_window_exits``)."""
    nmi: NmiState = ctx.vcpu.state
    nmi.masked = False
    nmi.window_exits += 1
    ctx.notes["nmi"] = f"NMIs unmasked ({nmi.pending} pending)"


@hookimpl
def sevsim_exit_handlers() -> Iterator[ExitHandler]:
    yield ExitHandler(ExitKind.VMGEXIT, VmgExit.NMI_COMPLETE, nmi_complete)
