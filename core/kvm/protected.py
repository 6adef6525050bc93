"""The vCPU state ioctls a VMM may try on an SEV-ES vCPU, and what KVM answers.

A VMM reads and writes a vCPU's registers in groups: KVM_GET/SET_REGS (GPRs, RIP,
RFLAGS), SREGS (segments, control registers, EFER), FPU and XSAVE (x87/SSE state),
DEBUGREGS. For an SEV-ES vCPU they stop making sense at LAUNCH_UPDATE_VMSA: from then
on the registers live only in the encrypted VMSA. What KVM does about it depends on
how the VM was created:

- a VM of type KVM_X86_SEV_ES_VM (KVM_SEV_INIT2, ~6.10) ``has_protected_state``: each
  of these ioctls fails with -EINVAL once ``guest_state_protected`` is set;
- a VM made the 5.11 way (KVM_SEV_ES_INIT on a default VM) accepts them: GET returns
  KVM's stale copy (``vcpu->arch.regs`` as the last GHCB sync left them, the state
  the VMM set for the rest) and SET changes only that copy, never the guest.

KVM_SET_GUEST_DEBUG is refused for a protected vCPU in both (8d4846b9b150, part of
the original series): KVM could neither single-step the guest nor read its DRs.
"""

from __future__ import annotations

from collections.abc import Mapping

from sevsim.arch.vmsa import GPR_NAMES, SEGMENT_NAMES

#: The VMSA fields each ioctl pair covers (``GET_<group>`` / ``SET_<group>``).
STATE_GROUPS: Mapping[str, tuple[str, ...]] = {
    "REGS": (*GPR_NAMES, "rip", "rflags"),
    "SREGS": (*SEGMENT_NAMES, "cr0", "cr2", "cr3", "cr4", "efer"),
    "FPU": ("x87_fcw", "x87_fsw", "x87_ftw", "x87_fop", "x87_rip", "x87_dp", "mxcsr",
            "fpreg_x87", "fpreg_xmm"),
    "XSAVE": ("x87_fcw", "x87_fsw", "x87_ftw", "x87_fop", "x87_rip", "x87_dp", "mxcsr",
              "fpreg_x87", "fpreg_xmm", "fpreg_ymm", "xcr0", "xss"),
    "DEBUGREGS": ("dr0", "dr1", "dr2", "dr3", "dr6", "dr7"),
}  # fmt: skip

#: The ioctl names, ``KVM_GET_REGS`` .. ``KVM_SET_DEBUGREGS``.
STATE_IOCTLS = tuple(f"KVM_{op}_{group}" for group in STATE_GROUPS for op in ("GET", "SET"))


def group_of(ioctl: str) -> str | None:
    """``"REGS"`` for ``"KVM_GET_REGS"``; None for a name that is not a state ioctl."""
    if ioctl not in STATE_IOCTLS:
        return None
    return ioctl.split("_", 2)[2]


def refuses_protected_state(era: str) -> bool:
    """Whether a VM of ``era`` fails the state ioctls of a protected vCPU with -EINVAL
    (``kvm->arch.has_protected_state``: KVM_X86_SEV_ES_VM, the newest KVM's type)."""
    return era != "v5.11"
