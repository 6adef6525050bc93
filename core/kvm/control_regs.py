"""KVM's own copy of a vCPU's CR0, CR4, CR8 and EFER (``vcpu->arch.cr0``, ...).

For an ordinary guest KVM reads these from the VMCB save area. For an SEV-ES guest
the save area is the encrypted VMSA, so KVM's copy is all it has: set from the
VMM's initial state before launch, then updated only by the write traps the
hardware raises after the guest's own writes (REFERENCE.md section 5, the
``crtraps`` plugin). KVM's MMU role, LMA and what it would report of the guest's
control registers come from here; without the traps handled, it lags behind.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from attrs import define

from sevsim.arch import msr as M


@define
class ControlRegs:
    """The values KVM believes the guest's control registers hold."""

    #: ``kvm_vcpu_reset``: CD | NW | ET, until the VMM sets its own.
    cr0: int = M.CR0_CD | M.CR0_NW | M.CR0_ET
    cr4: int = 0
    #: The task-priority register (no in-kernel LAPIC: KVM keeps it here).
    cr8: int = 0
    #: Without EFER.SVME, which KVM's copy never shows the guest.
    efer: int = 0

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ControlRegs:
        """KVM_SET_SREGS before launch: the VMM's CR0/CR4/EFER and V_TPR (VMSA names)."""
        regs = cls()
        for name in ("cr0", "cr4", "efer"):
            if name in state:
                setattr(regs, name, state[name])
        regs.efer &= ~M.EFER_SVME
        regs.cr8 = state.get("vintr_ctrl", 0) & 0xF  # V_TPR
        return regs

    @property
    def paging(self) -> bool:
        """``is_paging``: CR0.PG as KVM last saw it."""
        return bool(self.cr0 & M.CR0_PG)
