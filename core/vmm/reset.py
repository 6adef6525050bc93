"""The register state of an SEV-ES vCPU at x86 reset, as QEMU gives it to KVM.

The VMSA is measured at LAUNCH_UPDATE_VMSA, so its initial contents must match, bit
for bit, what the guest owner predicts. They are QEMU's ``x86_cpu_reset`` state
(CR0 0x60000010, EFER 0, CR4 0; RDX holds the CPUID signature, QEMU's
``env->cpuid_version``; x87 FCW and MXCSR at their reset values, as QEMU sets them
for KVM_SEV_INIT2 VMs), which KVM's ``sev_es_sync_vmsa`` then adjusts
(``sevsim.kvm.svm_setup.sync_vmsa_fields``: EFER.SVME set, CR0.CD/NW cleared,
CR4.MCE set). sev-snp-measure predicts the adjusted page.

The BSP starts at the reset vector 0xfffffff0; QEMU starts each AP at the address
in the firmware's SEV-ES reset block, split the same way into CS base and IP.
"""

from __future__ import annotations

from typing import Any

from sevsim.arch.msr import DR7_RESET_VALUE, PAT_DEFAULT
from sevsim.arch.vmsa import Segment
from sevsim.vmm.firmware import FirmwareImage

#: Where the BSP starts: CS base 0xffff0000, IP 0xfff0.
BSP_RESET_EIP = 0xFFFF_FFF0
#: CS selector after reset; the 0xffff0000 base lives only in the descriptor cache.
RESET_CS_SELECTOR = 0xF000
REAL_MODE_LIMIT = 0xFFFF

# Segment attributes in VMCB (packed) form: type | S << 4 | DPL << 5 | P << 7.
ATTR_CODE = 0x9B  # present, code, readable, accessed
ATTR_DATA = 0x93  # present, data, writable, accessed
ATTR_LDT = 0x82  # present, system, LDT
ATTR_TSS = 0x8B  # present, system, busy 32-bit TSS

#: QEMU's CR0 after reset: CD | NW | ET (KVM clears CD and NW for the VMSA).
CR0_RESET = 0x6000_0010
DR6_RESET = 0xFFFF_0FF0  # DR6_FIXED_1
RFLAGS_RESET = 0x2  # bit 1 always set
XCR0_X87 = 0x1
MXCSR_RESET = 0x1F80
FCW_RESET = 0x37F


def reset_vmsa_fields(eip: int, vcpu_sig: int) -> dict[str, Any]:
    """VMSA field values (segments as packed ``vmcb_seg`` bytes) of a vCPU reset at ``eip``.

    Feed the result to ``VMSA.pack(fields, size=VMSA_PAGE_SIZE)`` for the page that
    LAUNCH_UPDATE_VMSA measures.
    """
    data = Segment(0, ATTR_DATA, REAL_MODE_LIMIT, 0).pack()
    return {
        "es": data,
        "cs": Segment(RESET_CS_SELECTOR, ATTR_CODE, REAL_MODE_LIMIT, eip & 0xFFFF_0000).pack(),
        "ss": data,
        "ds": data,
        "fs": data,
        "gs": data,
        "gdtr": Segment(0, 0, REAL_MODE_LIMIT, 0).pack(),
        "ldtr": Segment(0, ATTR_LDT, REAL_MODE_LIMIT, 0).pack(),
        "idtr": Segment(0, 0, REAL_MODE_LIMIT, 0).pack(),
        "tr": Segment(0, ATTR_TSS, REAL_MODE_LIMIT, 0).pack(),
        "efer": 0,
        "cr4": 0,
        "cr0": CR0_RESET,
        "dr7": DR7_RESET_VALUE,
        "dr6": DR6_RESET,
        "rflags": RFLAGS_RESET,
        "rip": eip & 0xFFFF,
        "g_pat": PAT_DEFAULT,
        "rdx": vcpu_sig,
        "sev_features": 0,
        "xcr0": XCR0_X87,
        "mxcsr": MXCSR_RESET,
        "x87_fcw": FCW_RESET,
    }


def firmware_reset_states(firmware: FirmwareImage, vcpus: int, vcpu_sig: int
                          ) -> list[dict[str, Any]]:  # fmt: skip
    """The reset state of each of ``vcpus`` vCPUs booting ``firmware``: the BSP at the
    reset vector, the APs (QEMU's SEV-ES rule) at the firmware's SEV-ES reset block,
    which a firmware booted on one vCPU need not have."""
    ap_eip = firmware.sev_es_reset_eip() if vcpus > 1 else BSP_RESET_EIP
    return [reset_vmsa_fields(BSP_RESET_EIP if index == 0 else ap_eip, vcpu_sig)
            for index in range(vcpus)]  # fmt: skip
