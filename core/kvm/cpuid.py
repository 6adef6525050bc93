"""The guest's CPUID table (what KVM_SET_CPUID2 installs), and KVM's lookup rules.

An SEV-ES guest cannot execute CPUID natively in a way the hypervisor controls, so
it asks: through the GHCB MSR protocol (one register at a time) or a CPUID NAE
event. Both read this table. The default describes an EPYC-like part, with CPUID
0x8000001F reporting SEV, SEV-ES, the C-bit and the ASID counts as KVM reports them.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping

from attrs import define, frozen

from sevsim.arch import msr as M
from sevsim.errors import ConfigError
from sevsim.hw import CpuidLeaf, SevCapabilities

CPUID_FN_SEV = 0x8000_001F

#: Leaf 1 ECX: SSE3, PCLMULQDQ, SSSE3, FMA, CX16, SSE4.1, SSE4.2, MOVBE, POPCNT, AES,
#: XSAVE, AVX, F16C, RDRAND, and "running on a hypervisor". OSXSAVE (bit 27) is clear:
#: it mirrors CR4.OSXSAVE, which the guest has not set at reset.
_LEAF1_ECX = 0x76D8_3203 | (1 << 31)
#: Leaf 1 EDX: the usual x86-64 baseline (FPU .. SSE2, HTT off).
_LEAF1_EDX = 0x178B_FBFF
_BRAND = b"AMD EPYC Processor (sevsim)".ljust(48, b"\0")


def _regs_of(text: bytes) -> tuple[int, ...]:
    return struct.unpack("<4I", text)


def epyc_leaves(caps: SevCapabilities, signature: int) -> dict[tuple[int, int], CpuidLeaf]:
    """An EPYC-like CPUID table for a vCPU with the given family/model/stepping."""
    vendor = struct.unpack("<3I", b"AuthenticAMD")  # EBX, EDX, ECX order
    brand = [_regs_of(_BRAND[i : i + 16]) for i in range(0, 48, 16)]
    leaves = {
        (0x0, 0): CpuidLeaf(0xD, vendor[0], vendor[2], vendor[1]),
        (0x1, 0): CpuidLeaf(signature, 0x0000_0800, _LEAF1_ECX, _LEAF1_EDX),
        (0x7, 0): CpuidLeaf(0, 0x0000_0089, 0, 0),  # FSGSBASE, BMI1, SMEP
        (0xD, 0): CpuidLeaf(0x7, 0x240, 0x340, 0),  # x87|SSE|AVX
        (0xD, 1): CpuidLeaf(0x1, 0, 0, 0),
        (0x8000_0000, 0): CpuidLeaf(CPUID_FN_SEV, vendor[0], vendor[2], vendor[1]),
        (0x8000_0001, 0): CpuidLeaf(signature, 0, 0x0000_0121, 0x2FD3_FBFF),  # LM, NX, SYSCALL
        (0x8000_0002, 0): CpuidLeaf(*brand[0]),
        (0x8000_0003, 0): CpuidLeaf(*brand[1]),
        (0x8000_0004, 0): CpuidLeaf(*brand[2]),
        (0x8000_0008, 0): CpuidLeaf(0x0000_3030, 0, 0, 0),  # 48 physical, 48 virtual bits
        (CPUID_FN_SEV, 0): caps.cpuid(),
    }
    return leaves


@frozen
class CpuidModel:
    """A vCPU's CPUID answers, keyed by (function, index)."""

    leaves: Mapping[tuple[int, int], CpuidLeaf]

    @classmethod
    def default(cls, caps: SevCapabilities, signature: int = 0x0080_0F12) -> CpuidModel:
        return cls(epyc_leaves(caps, signature))

    def with_overrides(self, overrides: Mapping[str, object]) -> CpuidModel:
        """Replace leaves from settings: ``{"0x80000001": [eax, ebx, ecx, edx], ...}``.

        A key may name an index too: ``"0xd.1"``.
        """
        leaves = dict(self.leaves)
        for key, value in overrides.items():
            function, _, index = str(key).partition(".")
            try:
                where = (int(function, 0), int(index or "0", 0))
                regs = [int(v) for v in value]  # type: ignore[attr-defined]
            except (TypeError, ValueError):
                raise ConfigError(
                    f"CPUID override {key!r} = {value!r}: expected 'FUNCTION[.INDEX]' = "
                    "[eax, ebx, ecx, edx] with integers"
                ) from None
            if len(regs) != 4 or any(not 0 <= r <= 0xFFFF_FFFF for r in regs):
                raise ConfigError(f"CPUID override {key!r}: need four 32-bit values, got {value!r}")
            leaves[where] = CpuidLeaf(*regs)
        return CpuidModel(leaves)

    def lookup(self, function: int, index: int = 0) -> CpuidLeaf:
        """KVM's ``kvm_cpuid`` on AMD: an unknown leaf reads as zeros.

        Leaves without sub-leaves ignore ``index``, as hardware does.
        """
        leaf = self.leaves.get((function, index))
        if leaf is None and index and not any(f == function and i for f, i in self.leaves):
            leaf = self.leaves.get((function, 0))
        return leaf or CpuidLeaf(0, 0, 0, 0)


#: XSAVE area size for the components XCR0 (| XSS) enables: x87 and SSE share the
#: 512-byte legacy area plus the 64-byte header; AVX adds 256 bytes at 576.
_XSAVE_SIZES = ((1 << 2, 0x340), (1 << 1, 0x240), (1 << 0, 0x240))
_APIC_BASE_ENABLE = 1 << 11


def xstate_size(components: int) -> int:
    """``xstate_required_size``: bytes an XSAVE of ``components`` needs."""
    return next(size for bit, size in _XSAVE_SIZES if components & bit or bit == 1)


@define
class CpuidRuntime:
    """The bits of CPUID that reflect a vCPU's state (``kvm_update_cpuid_runtime``).

    KVM rewrites them whenever the state changes: OSXSAVE follows CR4.OSXSAVE, OSPKE
    follows CR4.PKE, the APIC bit follows APIC_BASE's global enable, and leaf 0xD's
    sizes follow XCR0 and XSS. For an SEV-ES guest KVM learns CR4 from the CR4 write
    trap, XCR0 from the GHCB and XSS/APIC_BASE from MSR writes. ``apic_id`` is the
    vCPU's own (leaf 1 EBX[31:24], leaf 0xB EDX), as QEMU sets it in each vCPU's table.
    """

    apic_id: int = 0
    cr4: int = 0
    xcr0: int = 1
    xss: int = 0
    apic_base: int = 0xFEE0_0000 | _APIC_BASE_ENABLE | (1 << 8)

    #: MSRs whose writes KVM folds into this record.
    MSRS = {M.MSR_IA32_XSS: "xss", M.MSR_IA32_APICBASE: "apic_base"}

    def update(self, **values: int) -> None:
        for name, value in values.items():
            setattr(self, name, value)

    def apply(self, table: CpuidModel, function: int, index: int) -> CpuidLeaf:
        """``kvm_cpuid`` on ``table`` with this vCPU's runtime bits."""
        leaf = table.lookup(function, index)
        eax, ebx, ecx, edx = leaf.eax, leaf.ebx, leaf.ecx, leaf.edx
        if function == 1:
            if ecx & (1 << 26):  # XSAVE offered: OSXSAVE mirrors CR4
                ecx = ecx & ~(1 << 27) | (1 << 27 if self.cr4 & M.CR4_OSXSAVE else 0)
            edx = edx & ~(1 << 9) | (1 << 9 if self.apic_base & _APIC_BASE_ENABLE else 0)
            ebx = ebx & 0x00FF_FFFF | (self.apic_id & 0xFF) << 24
        elif function == 0xB:
            edx = self.apic_id
        elif function == 7 and index == 0 and ecx & (1 << 3):  # PKU offered: OSPKE
            ecx = ecx & ~(1 << 4) | (1 << 4 if self.cr4 & M.CR4_PKE else 0)
        elif function == 0xD and index == 0:
            ebx = xstate_size(self.xcr0)
        elif function == 0xD and index == 1 and eax & (0b1010):  # XSAVEC or XSAVES
            ebx = xstate_size(self.xcr0 | self.xss)
        return CpuidLeaf(eax, ebx, ecx, edx)
