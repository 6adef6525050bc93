"""What KVM holds for a vCPU between runs: NMIs to inject, and the AP reset hold.

KVM injects an NMI through EVENTINJ when NMIs are not masked, then masks them. An
ordinary guest unmasks them with IRET, which KVM intercepts; an SEV-ES guest's IRET
cannot be intercepted, so the guest says "NMI handled" with an NMI_COMPLETE VMGEXIT
(the ``nmi`` plugin) and KVM unmasks then. Without that plugin a second NMI stays
pending for ever, exactly as it would in a KVM without SEV-ES NMI support.

An AP an SEV-ES guest takes offline cannot be reset by KVM (its registers are
sealed): it parks itself with AP_HLT_LOOP or the MSR-protocol AP_RESET_HOLD request
(the ``apboot`` plugin), and the next SIPI releases it by answering that request, so
the AP's own code carries on from where it parked (REFERENCE.md section 6).
"""

from __future__ import annotations

from enum import Enum, IntEnum

from attrs import define

from sevsim.arch.vmcb import EventInj


class MpState(IntEnum):
    """``KVM_MP_STATE_*`` values a vCPU of sevsim can be in."""

    RUNNABLE = 0
    AP_RESET_HOLD = 9


class ApResetHoldType(Enum):
    """``ap_reset_hold_type``: how the parked AP asked, hence how a SIPI answers."""

    NONE = "none"
    NAE = "nae"  # AP_HLT_LOOP through the GHCB: sw_exit_info_2 = 1
    MSR_PROTO = "msr_proto"  # the GHCB MSR request 0x006: reply 0x007 with result 1


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
