"""``init_vmcb`` + ``sev_init_vmcb`` + ``sev_es_init_vmcb``: the VMCB of an SEV-ES vCPU.

What KVM intercepts decides what becomes a #VC in the guest (the hardware turns an
intercepted event of an SEV-ES guest into a #VC instead of an exit), and which MSRs
it passes through decides which RDMSR/WRMSR run natively.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from sevsim.arch import msr as M
from sevsim.arch.vmcb import VMCB_CONTROL, NestedCtl
from sevsim.hw import msrpm_bit

if TYPE_CHECKING:
    from sevsim.kvm.cpuid import CpuidModel

#: Intercept bits KVM sets for an SEV-ES guest (APM bit numbers).
SEV_ES_INTERCEPTS = (
    39,  # DR7 read
    55,  # DR7 write
    96, 97, 98,  # INTR, NMI, SMI
    111,  # RDPMC
    114,  # CPUID
    118,  # INVD
    120,  # HLT
    122,  # INVLPGA (INVLPG only without NPT, which SEV requires)
    123,  # IOIO_PROT
    124,  # MSR_PROT
    125,  # TASK_SWITCH
    127,  # SHUTDOWN
    128, 129, 130, 131, 132, 133, 134,  # VMRUN VMMCALL VMLOAD VMSAVE STGI CLGI SKINIT
    137, 138, 139,  # WBINVD MONITOR MWAIT
    142,  # RDPRU: init_vmcb always sets it (KVM never offers RDPRU to a guest)
    143, 144, 148, 152,  # TRAP_EFER_WRITE, TRAP_CR0/CR4/CR8_WRITE
)  # fmt: skip
#: The RDTSCP intercept, which follows the guest's CPUID (see
#: :func:`recalc_instruction_intercepts`).
RDTSCP_BIT = 135
#: CPUID 0x80000001 EDX: RDTSCP.
_CPUID_RDTSCP = (0x8000_0001, 27)

#: The VINTR intercept, armed only while KVM waits for an interrupt window.
VINTR_BIT = 100

#: MSRs an SEV-ES guest reaches directly (KVM's direct-access list plus the SEV-ES ones).
PASSTHROUGH_MSRS = (
    M.MSR_AMD64_SEV_ES_GHCB, M.MSR_EFER, M.MSR_IA32_CR_PAT, M.MSR_STAR, M.MSR_LSTAR,
    M.MSR_CSTAR, M.MSR_SFMASK, M.MSR_FS_BASE, M.MSR_GS_BASE, M.MSR_KERNEL_GS_BASE,
    M.MSR_IA32_SYSENTER_CS, M.MSR_IA32_SYSENTER_ESP, M.MSR_IA32_SYSENTER_EIP,
)  # fmt: skip


def recalc_instruction_intercepts(cpuid: CpuidModel, era: str) -> int:
    """``svm_recalc_instruction_intercepts``: the intercepts that follow the guest's CPUID.

    Since 5.13 KVM intercepts RDTSCP only when the guest's CPUID lacks it (the exit
    then injects #UD); a guest that has it runs it natively. 5.11 never set the
    intercept, whatever the CPUID said.
    """
    function, bit = _CPUID_RDTSCP
    has_rdtscp = cpuid.lookup(function).edx >> bit & 1
    return 1 << RDTSCP_BIT if era != "v5.11" and not has_rdtscp else 0


def init_vmcb(vmcb: bytearray, msrpm: bytearray, asid: int, vmsa_pa: int, msrpm_pa: int,
              cpuid_intercepts: int) -> None:  # fmt: skip
    """``init_vmcb`` + ``sev_es_init_vmcb``; ``cpuid_intercepts`` is what
    :func:`recalc_instruction_intercepts` decided for the guest's CPUID."""
    intercepts = sum(1 << bit for bit in SEV_ES_INTERCEPTS) | cpuid_intercepts
    VMCB_CONTROL.set(vmcb, "intercepts", intercepts.to_bytes(24, "little"))
    nested = NestedCtl.NP_ENABLE | NestedCtl.SEV_ENABLE | NestedCtl.SEV_ES_ENABLE
    VMCB_CONTROL.set(vmcb, "nested_ctl", int(nested))
    VMCB_CONTROL.set(vmcb, "asid", asid)
    VMCB_CONTROL.set(vmcb, "vmsa_pa", vmsa_pa)  # without the C-bit
    VMCB_CONTROL.set(vmcb, "msrpm_base_pa", msrpm_pa)
    msrpm[:] = b"\xff" * len(msrpm)
    for msr in PASSTHROUGH_MSRS:
        for write in (False, True):
            where = msrpm_bit(msr, write)
            assert where is not None, hex(msr)
            msrpm[where[0]] &= ~(1 << where[1]) & 0xFF



#: ``sev_es_sync_vmsa``'s defaults for what a VMM need not set: KVM's reset values of
#: XCR0, DR6 and (for KVM_SEV_INIT2 VMs) the x87/SSE state.
VMSA_DEFAULTS: Mapping[str, int] = {"xcr0": 1, "dr6": 0xFFFF_0FF0, "x87_fcw": 0x37F,
                                    "mxcsr": 0x1F80}  # fmt: skip


def sync_vmsa_fields(state: Mapping[str, Any], sev_features: int) -> dict[str, Any]:
    """The VMSA ``sev_es_sync_vmsa`` writes from the VMM's register state.

    KVM's setters adjust what the VMM gave: ``svm_set_efer`` sets EFER.SVME in the
    VMCB, ``svm_set_cr0`` clears CR0.CD and CR0.NW (KVM_X86_QUIRK_CD_NW_CLEARED),
    ``svm_set_cr4`` adds the host's CR4.MCE; fields the VMM left alone take KVM's
    defaults; ``sev_features`` is the VM's.
    """
    fields = {**VMSA_DEFAULTS, **state, "sev_features": sev_features}
    fields["efer"] = fields.get("efer", 0) | M.EFER_SVME
    fields["cr0"] = fields.get("cr0", 0) & ~(M.CR0_CD | M.CR0_NW)
    fields["cr4"] = fields.get("cr4", 0) | M.CR4_MCE
    return fields
