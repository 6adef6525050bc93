"""The MSRs KVM emulates for a guest that asks through the GHCB (``kvm_get/set_msr``).

Only intercepted MSRs ever reach here: the hardware lets the guest touch EFER, PAT,
the SYSCALL MSRs, FS/GS bases and the GHCB MSR directly. What is left is what KVM
itself answers; an MSR it does not know fails, and the guest gets #GP.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from attrs import define, field

from sevsim.arch import msr as M

MSR_IA32_SPEC_CTRL = 0x48
MSR_IA32_MTRRCAP = 0xFE
MSR_IA32_MISC_ENABLE = 0x1A0
MSR_MTRR_DEF_TYPE = 0x2FF
MSR_MTRR_PHYS_FIRST, MSR_MTRR_PHYS_LAST = 0x200, 0x20F
MSR_MTRR_FIXED = (0x250, 0x258, 0x259, *range(0x268, 0x270))
MSR_K7_HWCR = 0xC001_0015
MSR_AMD64_PATCH_LEVEL = 0x8B
APIC_BASE_BSP = 0xFEE0_0000 | (1 << 11) | (1 << 8)  # enabled, BSP


def _initial() -> dict[int, int]:
    values = {
        M.MSR_IA32_TSC: 0,
        M.MSR_IA32_APICBASE: APIC_BASE_BSP,
        MSR_IA32_MTRRCAP: 0x508,  # 8 variable ranges, fixed ranges, write-combining
        MSR_MTRR_DEF_TYPE: 0,
        MSR_IA32_MISC_ENABLE: 1,  # fast strings
        MSR_IA32_SPEC_CTRL: 0,
        MSR_K7_HWCR: 0,
        MSR_AMD64_PATCH_LEVEL: 0,
        M.MSR_TSC_AUX: 0,
        M.MSR_IA32_XSS: 0,
    }
    values.update(dict.fromkeys(range(MSR_MTRR_PHYS_FIRST, MSR_MTRR_PHYS_LAST + 1), 0))
    values.update(dict.fromkeys(MSR_MTRR_FIXED, 0))
    return values


#: MSRs a guest may read but not change (writes fail with #GP).
READ_ONLY = frozenset({MSR_IA32_MTRRCAP, MSR_AMD64_PATCH_LEVEL})


@define
class MsrModel:
    """One vCPU's emulated MSRs: a value per MSR, reads and writes that may fail."""

    values: dict[int, int] = field(factory=_initial)
    #: Called on writes to an MSR with side effects (none by default).
    on_write: Mapping[int, Callable[[int], bool]] = field(factory=dict)

    def read(self, index: int) -> int | None:
        """The value, or None when KVM would fail the read (#GP to the guest)."""
        return self.values.get(index)

    def write(self, index: int, value: int) -> bool:
        """Store ``value``; False when KVM would fail the write (#GP to the guest)."""
        if index not in self.values or index in READ_ONLY:
            return False
        hook = self.on_write.get(index)
        if hook is not None and not hook(value):
            return False
        self.values[index] = value
        return True
